#include "runtime/serve.h"

#include <algorithm>
#include <chrono>

namespace ferry {

Expected<ServeStats> serve(Runner& runner, const std::vector<ServeRequest>& requests, const ServeOptions& opts, std::vector<ServeResult>& results,
                           const ServeDone& on_done, const ServeProgress& on_progress) {
  FERRY_RETURN_IF_ERROR(opts.sampling.validate());
  Engine engine(runner, EngineOptions{opts.batch, opts.max_step_tokens, opts.whole_prompts, opts.prefix_cache && !runner.kv().has_disk(),
                                      /*record_step_shapes=*/true});
  FERRY_RETURN_IF_ERROR(engine.validate_options());
  KvCache& kv = runner.kv();
  const int64_t n = static_cast<int64_t>(requests.size());
  std::vector<EngineRequest> reqs(n);
  for (int64_t i = 0; i < n; ++i) {
    EngineRequest& r = reqs[i];
    r.prompt = requests[i].prompt;
    r.max_tokens = requests[i].max_tokens;
    r.sampling = opts.sampling;
    r.sampling.seed = opts.sampling.seed + static_cast<uint64_t>(i);
    r.stop_at_eos = opts.stop_at_eos;
    FERRY_RETURN_IF_ERROR(engine.validate(r).with_context(strprintf("request %lld", (long long)i)));
  }
  for (int64_t i = 0; i < n; ++i) FERRY_RETURN_IF_ERROR(engine.submit(std::move(reqs[i])).status());  // ids 0..n-1
  results.assign(n, ServeResult{});
  ServeStats stats;
  stats.n_requests = n;
  int64_t done = 0;
  const auto t0 = std::chrono::steady_clock::now();
  auto now_ms = [&] { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(); };
  const int64_t spilled_before = kv.blocks_spilled(), restored_before = kv.blocks_restored();
  std::vector<EngineEvent> events;
  while (done < n) {
    if (opts.stop && opts.stop->load(std::memory_order_relaxed)) {  // interrupted: the finished ones stand
      stats.interrupted = true;
      break;
    }
    FERRY_RETURN_IF_ERROR(engine.step(events));
    const double t_ms = now_ms();
    for (const EngineEvent& e : events) {
      if (e.prompt) continue;
      ServeResult& res = results[e.id];
      if (res.tokens.empty()) res.ttft_ms = t_ms;
      res.tokens.push_back(e.token);
      res.latency_ms = t_ms;
      if (e.finish == FinishReason::kNone) continue;
      res.hit_eos = e.finish == FinishReason::kEos;
      res.finished = true;
      ++done;
      if (on_done) on_done(e.id, res);
    }
    if (on_progress) on_progress(done, n, engine.stats().generated_tokens, t_ms);
  }
  static_cast<EngineStats&>(stats) = engine.stats();
  stats.blocks_spilled = kv.blocks_spilled() - spilled_before;
  stats.blocks_restored = kv.blocks_restored() - restored_before;
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
