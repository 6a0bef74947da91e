#include "runtime/generate.h"

#include <algorithm>
#include <chrono>

namespace ferry {

namespace {
double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

int64_t kv_blocks_needed(const std::vector<int64_t>& lengths, int64_t block_size) {
  int64_t n = 0;
  for (int64_t l : lengths) n += (l + block_size - 1) / block_size;
  return n;
}

Expected<GenerateResult> generate(Runner& runner, const std::vector<std::vector<int32_t>>& prompts, const GenerateOptions& opts,
                                  const TokenCallback& on_token) {
  FERRY_RETURN_IF_ERROR(opts.sampling.validate());
  const ModelConfig& cfg = runner.config();
  const int64_t n_seq = static_cast<int64_t>(prompts.size());
  GenerateResult res;
  res.tokens.resize(n_seq);
  for (int64_t i = 0; i < n_seq; ++i) {
    if (prompts[i].empty()) return invalid_argument(strprintf("prompt %lld is empty (no BOS token to start from)", static_cast<long long>(i)));
    if (static_cast<int64_t>(prompts[i].size()) > cfg.n_ctx_max)
      return invalid_argument(strprintf("prompt %lld has %zu tokens, more than max_position_embeddings (%lld)", static_cast<long long>(i),
                                        prompts[i].size(), static_cast<long long>(cfg.n_ctx_max)));
    res.n_prompt_tokens += static_cast<int64_t>(prompts[i].size());
  }
  KvCache& kv = runner.kv();
  std::vector<int32_t> seq(n_seq);
  std::vector<Sampler> samplers;
  for (int64_t i = 0; i < n_seq; ++i) {
    seq[i] = kv.add_sequence();
    SamplingParams sp = opts.sampling;
    sp.seed = opts.sampling.seed + static_cast<uint64_t>(i);
    samplers.emplace_back(sp);
  }
  auto release = [&] {
    for (int32_t s : seq) kv.free_sequence(s);
  };
  auto is_eos = [&](int32_t tok) { return std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), tok) != cfg.eos_token_ids.end(); };

  Executor& ex = runner.executor();
  const bool on_device = ex.can_sample(opts.sampling);
  uint64_t step_no = 0;
  // Samples the output rows of the step just run, for prompts `who` (in row order).
  auto draw = [&](const std::vector<float>& lg, const std::vector<int64_t>& who, std::vector<int32_t>& into) -> Status {
    if (on_device) {
      std::vector<uint64_t> seeds;
      for (int64_t i : who) seeds.push_back(opts.sampling.seed + static_cast<uint64_t>(i));
      std::vector<int32_t> got(who.size());
      FERRY_RETURN_IF_ERROR(ex.sample(opts.sampling, seeds, step_no++, got.data()));
      for (size_t o = 0; o < who.size(); ++o) into[who[o]] = got[o];
      return Status::Ok();
    }
    for (size_t o = 0; o < who.size(); ++o) into[who[o]] = samplers[who[o]].sample(lg.data() + o * cfg.n_vocab, cfg.n_vocab);
    return Status::Ok();
  };
  std::vector<int32_t> last(n_seq, -1);
  std::vector<bool> done(n_seq, opts.n_predict <= 0);
  std::vector<float> logits;
  StepBatch b;

  // Prefill: walk all prompts in order, cutting steps at max_step_tokens.
  auto t0 = std::chrono::steady_clock::now();
  {
    int64_t i = 0, j = 0;
    while (i < n_seq) {
      b.clear();
      std::vector<int64_t> out_seq;
      while (i < n_seq && b.n_tokens() < opts.max_step_tokens) {
        const int64_t len = static_cast<int64_t>(prompts[i].size());
        const bool is_last = j == len - 1;
        b.add(prompts[i][j], static_cast<int32_t>(j), seq[i], is_last);
        if (is_last) out_seq.push_back(i);
        if (++j == len) {
          ++i;
          j = 0;
        }
      }
      Status st = runner.step(b, logits, !on_device);
      if (st.ok() && !out_seq.empty()) st = draw(logits, out_seq, last);
      if (!st.ok()) {
        release();
        return st;
      }
    }
  }
  res.prefill_ms = ms_since(t0);

  auto t1 = std::chrono::steady_clock::now();
  auto accept = [&](int64_t i) {
    if (done[i]) return;
    res.tokens[i].push_back(last[i]);
    ++res.n_generated;
    if (on_token) on_token(i, last[i]);
    if (static_cast<int64_t>(res.tokens[i].size()) >= opts.n_predict || (opts.stop_at_eos && is_eos(last[i])) ||
        kv.length(seq[i]) >= cfg.n_ctx_max)
      done[i] = true;
  };
  for (int64_t i = 0; i < n_seq; ++i) accept(i);
  while (true) {
    b.clear();
    std::vector<int64_t> active;
    for (int64_t i = 0; i < n_seq; ++i) {
      if (done[i]) continue;
      b.add(last[i], static_cast<int32_t>(kv.length(seq[i])), seq[i], true);
      active.push_back(i);
    }
    if (active.empty()) break;
    Status st = runner.step(b, logits, !on_device);
    if (st.ok()) st = draw(logits, active, last);
    if (!st.ok()) {
      release();
      return st;
    }
    ++res.n_decode_steps;
    for (int64_t i : active) accept(i);
  }
  res.decode_ms = ms_since(t1);
  release();
  return res;
}

Expected<std::vector<float>> prompt_logits(Runner& runner, const std::vector<int32_t>& ids, int64_t max_step_tokens) {
  const ModelConfig& cfg = runner.config();
  if (ids.empty()) return invalid_argument("--ids: no token ids given");
  if (static_cast<int64_t>(ids.size()) > cfg.n_ctx_max)
    return invalid_argument(strprintf("--ids: %zu tokens is more than max_position_embeddings (%lld)", ids.size(),
                                      static_cast<long long>(cfg.n_ctx_max)));
  KvCache& kv = runner.kv();
  const int32_t s = kv.add_sequence();
  std::vector<float> all(ids.size() * static_cast<size_t>(cfg.n_vocab));
  std::vector<float> logits;
  StepBatch b;
  for (size_t j0 = 0; j0 < ids.size(); j0 += static_cast<size_t>(max_step_tokens)) {
    b.clear();
    const size_t j1 = std::min(ids.size(), j0 + static_cast<size_t>(max_step_tokens));
    for (size_t j = j0; j < j1; ++j) b.add(ids[j], static_cast<int32_t>(j), s, true);
    if (Status st = runner.step(b, logits); !st.ok()) {
      kv.free_sequence(s);
      return st;
    }
    std::copy(logits.begin(), logits.end(), all.begin() + j0 * cfg.n_vocab);
  }
  kv.free_sequence(s);
  return all;
}

}  // namespace ferry
