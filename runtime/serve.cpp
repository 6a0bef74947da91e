#include "runtime/serve.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <optional>

#include "runtime/trace.h"

namespace ferry {

Expected<ServeStats> serve(Runner& runner, const std::vector<ServeRequest>& requests, const ServeOptions& opts, std::vector<ServeResult>& results,
                           const ServeDone& on_done, const ServeProgress& on_progress) {
  FERRY_RETURN_IF_ERROR(opts.sampling.validate());
  if (opts.batch < 1) return invalid_argument("--batch must be at least 1");
  if (opts.max_step_tokens < opts.batch)
    return invalid_argument(strprintf("--step-tokens %lld is below --batch %lld: a step must hold one token per live sequence",
                                      (long long)opts.max_step_tokens, (long long)opts.batch));
  const ModelConfig& cfg = runner.config();
  KvCache& kv = runner.kv();
  const int64_t bs = kv.shape().block_size;
  const int64_t n = static_cast<int64_t>(requests.size());
  ServeStats stats;
  stats.n_requests = n;
  for (int64_t i = 0; i < n; ++i) {
    const ServeRequest& r = requests[i];
    if (r.prompt.empty()) return invalid_argument(strprintf("request %lld: the prompt is empty", (long long)i));
    if (r.max_tokens < 1) return invalid_argument(strprintf("request %lld: max_tokens must be at least 1", (long long)i));
    for (int32_t t : r.prompt)
      if (t < 0 || t >= cfg.n_vocab) return invalid_argument(strprintf("request %lld: token id %d is outside the vocabulary (%lld)", (long long)i, t, (long long)cfg.n_vocab));
    const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
    if (total > cfg.n_ctx_max)
      return invalid_argument(strprintf("request %lld: %zu prompt tokens + %lld new ones pass max_position_embeddings (%lld)", (long long)i, r.prompt.size(),
                                        (long long)r.max_tokens, (long long)cfg.n_ctx_max));
    if ((total + bs - 1) / bs > kv.shape().n_blocks)
      return invalid_argument(strprintf("request %lld needs %lld KV blocks, more than the cache holds in host memory (%lld; --kv-mem)", (long long)i, (long long)((total + bs - 1) / bs),
                                        (long long)kv.shape().n_blocks));
    stats.prompt_tokens += static_cast<int64_t>(r.prompt.size());
  }
  results.assign(n, ServeResult{});
  Executor& ex = runner.executor();
  const bool on_device = ex.can_sample(opts.sampling);
  auto is_eos = [&](int32_t tok) { return std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), tok) != cfg.eos_token_ids.end(); };

  struct Live {
    int64_t req;
    int32_t seq;
    int64_t prefilled = 0;  // prompt tokens already in the KV cache
    int32_t last = -1;      // the token to feed next (decoding once the prompt is in)
    Sampler sampler;
    uint64_t last_run = 0;  // the last step it was in (with a disk tier not every live one runs)
  };
  std::vector<Live> live;
  std::deque<int64_t> queue;
  for (int64_t i = 0; i < n; ++i) queue.push_back(i);
  int64_t done = 0;
  const auto t0 = std::chrono::steady_clock::now();
  auto now_ms = [&] { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(); };
  auto release_all = [&] {
    for (const Live& l : live) kv.free_sequence(l.seq);
    live.clear();
  };

  const int64_t spilled_before = kv.blocks_spilled(), restored_before = kv.blocks_restored();
  StepBatch b;
  std::vector<float> logits;
  std::vector<int64_t> out_live;  // live index of each output row
  uint64_t step_no = 0;
  while (done < n) {
    if (opts.stop && opts.stop->load(std::memory_order_relaxed)) {  // interrupted: the finished ones stand
      stats.interrupted = true;
      release_all();
      break;
    }
    std::optional<TraceRange> sched(std::in_place, "serve.schedule");
    // Admission: a batch slot and blocks for the whole request.
    while (!queue.empty() && static_cast<int64_t>(live.size()) < opts.batch) {
      const ServeRequest& r = requests[queue.front()];
      const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
      if ((total + bs - 1) / bs > kv.n_free_blocks()) break;
      const int32_t seq = kv.add_sequence();
      if (Status st = kv.reserve(seq, total); !st.ok()) {
        kv.free_sequence(seq);
        release_all();
        return st;
      }
      SamplingParams sp = opts.sampling;
      sp.seed = opts.sampling.seed + static_cast<uint64_t>(queue.front());
      live.push_back(Live{queue.front(), seq, 0, -1, Sampler(sp)});
      results[queue.front()].admitted_ms = now_ms();
      queue.pop_front();
    }
    if (live.empty()) {
      release_all();
      return Status(ErrorCode::kInternal, "serve: no request fits the KV cache");  // ruled out above
    }
    stats.peak_live = std::max<int64_t>(stats.peak_live, static_cast<int64_t>(live.size()));
    // The step: one token of every decoding sequence, then prompt chunks in admission order. With
    // a disk tier, a sequence runs only if its blocks can be resident beside those already pinned
    // for this step: those in host memory go first, then the ones that waited longest.
    b.clear();
    out_live.clear();
    kv.begin_step();
    std::vector<int64_t> took(live.size(), 0);  // prompt tokens of each live sequence in this step
    std::vector<bool> run(live.size(), false);
    {
      std::vector<size_t> order;
      for (size_t i = 0; i < live.size(); ++i)
        if (live[i].prefilled >= static_cast<int64_t>(requests[live[i].req].prompt.size())) order.push_back(i);
      if (kv.has_disk()) {
        // Resident sequences first (no I/O: a disk tier does not thrash), then the longest-waiting;
        // spilled ones come back as blocks free up.
        std::vector<bool> in_host(live.size());
        for (size_t i : order) in_host[i] = kv.resident(live[i].seq, kv.length(live[i].seq));
        std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
          return in_host[x] != in_host[y] ? static_cast<bool>(in_host[x]) : live[x].last_run < live[y].last_run;
        });
      }
      for (size_t i : order) {
        auto ok = kv.make_resident(live[i].seq, kv.length(live[i].seq) + 1);
        if (!ok.ok()) {
          release_all();
          return ok.status();
        }
        run[i] = *ok;
      }
    }
    for (size_t i = 0; i < live.size(); ++i) {
      if (!run[i]) continue;
      Live& l = live[i];
      b.add(l.last, static_cast<int32_t>(kv.length(l.seq)), l.seq, true);
      out_live.push_back(static_cast<int64_t>(i));
    }
    for (size_t i = 0; i < live.size() && b.n_tokens() < opts.max_step_tokens; ++i) {
      Live& l = live[i];
      const auto& prompt = requests[l.req].prompt;
      const int64_t len = static_cast<int64_t>(prompt.size());
      if (l.prefilled >= len) continue;
      const int64_t room = opts.max_step_tokens - b.n_tokens();
      if (opts.whole_prompts && l.prefilled == 0 && len > room && len <= opts.max_step_tokens && b.n_tokens() > 0) continue;
      const int64_t take = std::min(len - l.prefilled, room);
      auto ok = kv.make_resident(l.seq, l.prefilled + take);
      if (!ok.ok()) {
        release_all();
        return ok.status();
      }
      if (!*ok) continue;
      run[i] = true;
      took[i] = take;
      stats.split_prompts += l.prefilled == 0 && take < len;
      for (int64_t j = l.prefilled; j < l.prefilled + take; ++j) {
        const bool last = j == len - 1;
        b.add(prompt[j], static_cast<int32_t>(j), l.seq, last);
        if (last) out_live.push_back(static_cast<int64_t>(i));
      }
    }
    if (b.n_tokens() == 0) {
      release_all();
      return Status(ErrorCode::kInternal, "serve: no sequence could run this step");  // the first always fits (checked above)
    }
    // Output rows: decode tokens first, then prompt-final tokens, each in live order: the order
    // they were pushed, which is the ascending order of b.output_rows.
    sched.reset();
    Status st = runner.step(b, logits, !on_device);
    std::vector<int32_t> drawn(out_live.size());
    if (st.ok() && !out_live.empty()) {
      if (on_device) {
        std::vector<uint64_t> seeds;
        for (int64_t li : out_live) seeds.push_back(opts.sampling.seed + static_cast<uint64_t>(live[li].req));
        st = ex.sample(opts.sampling, seeds, step_no, drawn.data());
      } else {
        for (size_t o = 0; o < out_live.size(); ++o) drawn[o] = live[out_live[o]].sampler.sample(logits.data() + o * cfg.n_vocab, cfg.n_vocab);
      }
    }
    ++step_no;
    if (!st.ok()) {
      release_all();
      return st;
    }
    ++stats.steps;
    TraceRange outputs("serve.outputs");
    {
      int64_t kv_read = 0;
      for (size_t i = 0; i < live.size(); ++i)
        if (run[i]) kv_read += kv.length(live[i].seq), live[i].last_run = step_no;
      stats.step_shapes.push_back({b.n_tokens(), kv_read});
    }
    stats.blocks_spilled = kv.blocks_spilled() - spilled_before;
    stats.blocks_restored = kv.blocks_restored() - restored_before;
    for (size_t i = 0; i < live.size(); ++i) live[i].prefilled += took[i];
    const double t_ms = now_ms();
    std::vector<bool> finished(live.size(), false);
    for (size_t o = 0; o < out_live.size(); ++o) {
      Live& l = live[out_live[o]];
      ServeResult& res = results[l.req];
      if (res.tokens.empty()) res.ttft_ms = t_ms;
      res.tokens.push_back(drawn[o]);
      res.latency_ms = t_ms;
      ++stats.generated_tokens;
      l.last = drawn[o];
      const bool eos = opts.stop_at_eos && is_eos(drawn[o]);
      if (eos || static_cast<int64_t>(res.tokens.size()) >= requests[l.req].max_tokens) {
        res.hit_eos = eos;
        finished[out_live[o]] = true;
      }
    }
    std::vector<Live> keep;
    for (size_t i = 0; i < live.size(); ++i) {
      if (!finished[i]) {
        keep.push_back(std::move(live[i]));
        continue;
      }
      kv.free_sequence(live[i].seq);
      results[live[i].req].finished = true;
      ++done;
      if (on_done) on_done(live[i].req, results[live[i].req]);
    }
    live = std::move(keep);
    if (on_progress) on_progress(done, n, stats.generated_tokens, t_ms);
  }
  stats.total_ms = now_ms();
  std::vector<double> ttft;
  for (const ServeResult& r : results)
    if (r.finished) ttft.push_back(r.ttft_ms);
  std::sort(ttft.begin(), ttft.end());
  if (!ttft.empty()) {
    double sum = 0;
    for (double x : ttft) sum += x;
    stats.ttft_mean_ms = sum / static_cast<double>(ttft.size());
    stats.ttft_p50_ms = ttft[ttft.size() / 2];
    stats.ttft_p90_ms = ttft[std::min(ttft.size() - 1, ttft.size() * 9 / 10)];
  }
  return stats;
}

}  // namespace ferry
