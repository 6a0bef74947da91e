#include "runtime/engine.h"

#include <algorithm>
#include <optional>

#include <xxhash.h>

#include "runtime/trace.h"

namespace ferry {

struct Engine::Live {
  int64_t id;
  EngineRequest req;
  int32_t seq;
  Sampler sampler;
  int64_t prefilled = 0;  // prompt tokens already in the KV cache
  int32_t last = -1;      // the token to feed next (decoding once the prompt is in)
  int64_t generated = 0;
  uint64_t last_run = 0;  // the last step it was in (with a disk tier not every live one runs)
  // Prefix cache: the tokens fed or to be fed (the prompt, then each drawn token), the blocks
  // registered and the hash of the last of them, the prompt tokens the cache served.
  std::vector<int32_t> tokens;
  int64_t n_registered = 0;
  uint64_t chain = 0;
  int64_t cached = 0;
  uint64_t first_hash = 0;  // its prompt's first full block's (0: none, or not cacheable)
};

namespace {

constexpr uint64_t kPrefixSeed = 0x66657272795f6b76ull;  // the chain's start

// The hash of a block of tokens and (through `prev`) every token before it; never 0.
uint64_t block_hash(uint64_t prev, const int32_t* tokens, int64_t n) {
  const uint64_t h = XXH3_64bits_withSeed(tokens, static_cast<size_t>(n) * sizeof(int32_t), prev);
  return h == 0 ? 1 : h;
}

}  // namespace

Engine::Engine(Runner& runner, const EngineOptions& opts) : runner_(runner), opts_(opts) {}
Engine::~Engine() { release_all(); }

Status Engine::validate_options() const {
  if (opts_.batch < 1) return invalid_argument("--batch must be at least 1");
  if (opts_.max_step_tokens < opts_.batch)
    return invalid_argument(strprintf("--step-tokens %lld is below --batch %lld: a step must hold one token per live sequence",
                                      (long long)opts_.max_step_tokens, (long long)opts_.batch));
  return Status::Ok();
}

Status Engine::validate(const EngineRequest& r) const {
  const ModelConfig& cfg = runner_.config();
  const KvCache& kv = runner_.kv();
  const int64_t bs = kv.shape().block_size;
  FERRY_RETURN_IF_ERROR(r.sampling.validate());
  if (r.prompt.empty()) return invalid_argument("the prompt is empty");
  if (r.max_tokens < 1) return invalid_argument("max_tokens must be at least 1");
  for (int32_t t : r.prompt)
    if (t < 0 || t >= cfg.n_vocab) return invalid_argument(strprintf("token id %d is outside the vocabulary (%lld)", t, (long long)cfg.n_vocab));
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_tokens;
  if (total > cfg.n_ctx_max)
    return invalid_argument(strprintf("%zu prompt tokens + %lld new ones pass max_position_embeddings (%lld)", r.prompt.size(), (long long)r.max_tokens,
                                      (long long)cfg.n_ctx_max));
  const int64_t need = (total + bs - 1) / bs;  // all in host memory at once when it runs, even with a disk tier
  if (r.continue_seq >= 0 && (r.continue_len < 0 || r.continue_len >= static_cast<int64_t>(r.prompt.size()) || r.continue_len > kv.length(r.continue_seq)))
    return invalid_argument(strprintf("a continued sequence must hold fewer tokens than the prompt (%lld of %zu; it has %lld)", (long long)r.continue_len,
                                      r.prompt.size(), (long long)kv.length(r.continue_seq)));
  if (need > kv.shape().n_blocks)
    return invalid_argument(strprintf("%zu prompt tokens + %lld new ones need %lld KV blocks of %lld tokens, more than the cache holds in host memory (%lld; --kv-mem)",
                                      r.prompt.size(), (long long)r.max_tokens, (long long)need, (long long)bs, (long long)kv.shape().n_blocks));
  return Status::Ok();
}

Expected<int64_t> Engine::submit(EngineRequest r) {
  FERRY_RETURN_IF_ERROR(validate(r));
  const int64_t id = next_id_++;
  stats_.prompt_tokens += static_cast<int64_t>(r.prompt.size());
  queue_.push_back(Queued{id, std::move(r)});
  return id;
}

void Engine::drop_sequence(int32_t seq) { runner_.kv().free_sequence(seq); }

void Engine::cancel(int64_t id) {
  for (size_t i = 0; i < queue_.size(); ++i)
    if (queue_[i].id == id) {
      queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(i));
      cancelled_.push_back(id);
      return;
    }
  for (size_t i = 0; i < live_.size(); ++i)
    if (live_[i].id == id) {
      runner_.kv().free_sequence(live_[i].seq);
      live_.erase(live_.begin() + static_cast<std::ptrdiff_t>(i));
      cancelled_.push_back(id);
      return;
    }
}

int64_t Engine::n_live() const { return static_cast<int64_t>(live_.size()); }

bool Engine::idle() const { return queue_.empty() && live_.empty() && cancelled_.empty(); }

void Engine::release_all() {
  for (const Live& l : live_) runner_.kv().free_sequence(l.seq);
  live_.clear();
  queue_.clear();
  cancelled_.clear();
}

Status Engine::step(std::vector<EngineEvent>& events) {
  events.clear();
  for (int64_t id : cancelled_) events.push_back(EngineEvent{id, -1, FinishReason::kCancelled});
  cancelled_.clear();
  if (queue_.empty() && live_.empty()) return Status::Ok();
  auto fail = [&](Status st) {
    release_all();
    return st;
  };
  const ModelConfig& cfg = runner_.config();
  KvCache& kv = runner_.kv();
  Executor& ex = runner_.executor();
  const int64_t bs = kv.shape().block_size;

  std::optional<TraceRange> sched(std::in_place, "serve.schedule");
  // Admission: a batch slot and blocks for the whole request.
  while (!queue_.empty() && static_cast<int64_t>(live_.size()) < opts_.batch) {
    Queued& q = queue_.front();
    const int64_t total = static_cast<int64_t>(q.req.prompt.size()) + q.req.max_tokens;
    const bool cont = q.req.continue_seq >= 0;
    const int64_t owned = cont ? static_cast<int64_t>(kv.block_table(q.req.continue_seq).size()) : 0;
    if ((total + bs - 1) / bs - owned > kv.n_free_blocks()) break;
    // The prefix cache: the longest run of the prompt's leading full blocks still cached, short of
    // its last token (whose logits the step must compute).
    const bool cacheable = opts_.prefix_cache && !kv.has_disk() && !cont && !q.req.keep_sequence && !q.req.prompt_logprobs;
    std::vector<uint64_t> hashes;  // of the prompt's full blocks short of its last token
    if (cacheable) {
      uint64_t h = kPrefixSeed;
      for (int64_t b = 0; b < (static_cast<int64_t>(q.req.prompt.size()) - 1) / bs; ++b) hashes.push_back(h = block_hash(h, q.req.prompt.data() + b * bs, bs));
    }
    const uint64_t first = hashes.empty() ? 0 : hashes[0];
    // A prompt whose first block a live sequence is still prefilling waits for it (a step or two)
    // rather than prefill the same tokens beside it: requests that arrive together with one system
    // prompt share it.
    if (first != 0 && !kv.is_cached(first) &&
        std::any_of(live_.begin(), live_.end(), [&](const Live& l) { return l.first_hash == first && l.n_registered == 0; }))
      break;
    const int32_t seq = cont ? q.req.continue_seq : kv.add_sequence();
    if (cont) kv.set_length(seq, q.req.continue_len);  // what it holds past the shared prefix is written over
    const int64_t shared = cacheable ? kv.share_prefix(seq, hashes) : 0;
    if (Status st = kv.reserve(seq, total); !st.ok()) {
      kv.free_sequence(seq);
      return fail(st);
    }
    Sampler sampler(q.req.sampling);
    const int64_t prefilled = cont ? q.req.continue_len : shared * bs;
    Live l{q.id, std::move(q.req), seq, std::move(sampler), prefilled};
    if (cacheable) {
      l.tokens = l.req.prompt;
      l.n_registered = shared;
      l.chain = shared > 0 ? hashes[shared - 1] : kPrefixSeed;
      l.cached = shared * bs;
      l.first_hash = first;
      stats_.cached_prompt_tokens += l.cached;
    }
    live_.push_back(std::move(l));
    queue_.erase(queue_.begin());
  }
  if (live_.empty()) return fail(Status(ErrorCode::kInternal, "serve: no request fits the KV cache"));  // ruled out by validate()
  stats_.peak_live = std::max<int64_t>(stats_.peak_live, static_cast<int64_t>(live_.size()));
  // The step: one token of every decoding sequence, then prompt chunks in admission order. With
  // a disk tier, a sequence runs only if its blocks can be resident beside those already pinned
  // for this step: those in host memory go first, then the ones that waited longest.
  batch_.clear();
  std::vector<int64_t> out_live;  // live index of each output row
  std::vector<int64_t> out_echo;  // per output row: -1 (a row to sample), or the prompt position it gives the next token's logprob of
  kv.begin_step();
  std::vector<int64_t> took(live_.size(), 0);  // prompt tokens of each live sequence in this step
  std::vector<bool> run(live_.size(), false);
  {
    std::vector<size_t> order;
    for (size_t i = 0; i < live_.size(); ++i)
      if (live_[i].prefilled >= static_cast<int64_t>(live_[i].req.prompt.size())) order.push_back(i);
    if (kv.has_disk()) {
      // Resident sequences first (no I/O: a disk tier does not thrash), then the longest-waiting;
      // spilled ones come back as blocks free up.
      std::vector<bool> in_host(live_.size());
      for (size_t i : order) in_host[i] = kv.resident(live_[i].seq, kv.length(live_[i].seq));
      std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
        return in_host[x] != in_host[y] ? static_cast<bool>(in_host[x]) : live_[x].last_run < live_[y].last_run;
      });
    }
    for (size_t i : order) {
      auto ok = kv.make_resident(live_[i].seq, kv.length(live_[i].seq) + 1);
      if (!ok.ok()) return fail(ok.status());
      run[i] = *ok;
    }
  }
  for (size_t i = 0; i < live_.size(); ++i) {
    if (!run[i]) continue;
    Live& l = live_[i];
    batch_.add(l.last, static_cast<int32_t>(kv.length(l.seq)), l.seq, true);
    out_live.push_back(static_cast<int64_t>(i));
    out_echo.push_back(-1);
  }
  for (size_t i = 0; i < live_.size() && batch_.n_tokens() < opts_.max_step_tokens; ++i) {
    Live& l = live_[i];
    const auto& prompt = l.req.prompt;
    const int64_t len = static_cast<int64_t>(prompt.size());
    if (l.prefilled >= len) continue;
    const int64_t room = opts_.max_step_tokens - batch_.n_tokens();
    if (opts_.whole_prompts && l.prefilled == 0 && len > room && len <= opts_.max_step_tokens && batch_.n_tokens() > 0) continue;
    const int64_t take = std::min(len - l.prefilled, room);
    auto ok = kv.make_resident(l.seq, l.prefilled + take);
    if (!ok.ok()) return fail(ok.status());
    if (!*ok) continue;
    run[i] = true;
    took[i] = take;
    stats_.split_prompts += l.prefilled == 0 && take < len;
    for (int64_t j = l.prefilled; j < l.prefilled + take; ++j) {
      const bool last = j == len - 1, echo = l.req.prompt_logprobs && !last;
      batch_.add(prompt[j], static_cast<int32_t>(j), l.seq, last || echo);
      if (last || echo) {
        out_live.push_back(static_cast<int64_t>(i));
        out_echo.push_back(last ? -1 : j);
      }
    }
  }
  if (batch_.n_tokens() == 0) return fail(Status(ErrorCode::kInternal, "serve: no sequence could run this step"));  // the first always fits
  // Sampling on the device when every output row asks for the same parameters (seeds aside) and the
  // executor can draw with them; otherwise on the host from each request's own sampler.
  const bool echo_rows = std::any_of(out_echo.begin(), out_echo.end(), [](int64_t j) { return j >= 0; });
  bool on_device = !out_live.empty() && !echo_rows;  // a device sampler draws for every output row
  for (int64_t li : out_live) {
    const SamplingParams& p = live_[li].req.sampling;
    const SamplingParams& p0 = live_[out_live[0]].req.sampling;
    on_device = on_device && p.temperature == p0.temperature && p.top_k == p0.top_k && p.top_p == p0.top_p;
  }
  on_device = on_device && ex.can_sample(live_[out_live[0]].req.sampling);
  // Requests that want log-probabilities need the logits on the host (a device sampler still
  // draws from its own copy).
  bool want_logits = echo_rows;
  for (int64_t li : out_live) want_logits = want_logits || live_[li].req.logprobs >= 0;
  // Output rows: decode tokens first, then prompt-final tokens, each in live order: the order
  // they were pushed, which is the ascending order of batch_.output_rows.
  sched.reset();
  Status st = runner_.step(batch_, logits_, !on_device || want_logits);
  std::vector<int32_t> drawn(out_live.size());
  if (st.ok() && !out_live.empty()) {
    if (on_device) {
      std::vector<uint64_t> seeds;
      for (int64_t li : out_live) seeds.push_back(live_[li].req.sampling.seed);
      st = ex.sample(live_[out_live[0]].req.sampling, seeds, step_no_, drawn.data());
    } else {
      for (size_t o = 0; o < out_live.size(); ++o)
        if (out_echo[o] < 0) drawn[o] = live_[out_live[o]].sampler.sample(logits_.data() + o * cfg.n_vocab, cfg.n_vocab);
    }
  }
  ++step_no_;
  if (!st.ok()) return fail(st);
  ++stats_.steps;
  TraceRange outputs("serve.outputs");
  {
    int64_t kv_read = 0;
    for (size_t i = 0; i < live_.size(); ++i)
      if (run[i]) kv_read += kv.length(live_[i].seq), live_[i].last_run = step_no_;
    if (opts_.record_step_shapes) stats_.step_shapes.push_back({batch_.n_tokens(), kv_read});
  }
  for (size_t i = 0; i < live_.size(); ++i) live_[i].prefilled += took[i];
  // Blocks that filled up in this step join the prefix cache.
  for (size_t i = 0; i < live_.size(); ++i) {
    Live& l = live_[i];
    if (!run[i] || l.tokens.empty()) continue;
    const int64_t full = kv.length(l.seq) / bs;
    for (; l.n_registered < full; ++l.n_registered) {
      l.chain = block_hash(l.chain, l.tokens.data() + l.n_registered * bs, bs);
      kv.register_block(l.seq, l.n_registered, l.chain);
    }
  }
  std::vector<bool> finished(live_.size(), false);
  auto is_eos = [&](int32_t tok) { return std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), tok) != cfg.eos_token_ids.end(); };
  for (size_t o = 0; o < out_live.size(); ++o) {
    Live& l = live_[out_live[o]];
    if (out_echo[o] >= 0) {  // echo: the next prompt token's log-probability
      EngineEvent e{l.id, l.req.prompt[out_echo[o] + 1], FinishReason::kNone, -1, l.cached};
      e.prompt = true;
      e.has_logprob = true;
      e.logprob = token_logprob(logits_.data() + o * cfg.n_vocab, cfg.n_vocab, e.token, std::max<int64_t>(l.req.logprobs, 0), &e.top);
      events.push_back(std::move(e));
      continue;
    }
    const int32_t tok = drawn[o];
    ++l.generated;
    ++stats_.generated_tokens;
    l.last = tok;
    FinishReason why = FinishReason::kNone;
    if (l.req.stop_at_eos && is_eos(tok))
      why = FinishReason::kEos;
    else if (std::find(l.req.stop_ids.begin(), l.req.stop_ids.end(), tok) != l.req.stop_ids.end())
      why = FinishReason::kStopId;
    else if (l.generated >= l.req.max_tokens)
      why = FinishReason::kLength;
    if (!l.tokens.empty()) l.tokens.push_back(tok);
    events.push_back(EngineEvent{l.id, tok, why, why != FinishReason::kNone && l.req.keep_sequence ? l.seq : -1, l.cached});
    if (l.req.logprobs >= 0) {
      EngineEvent& e = events.back();
      e.has_logprob = true;
      e.logprob = token_logprob(logits_.data() + o * cfg.n_vocab, cfg.n_vocab, tok, l.req.logprobs, &e.top);
    }
    finished[out_live[o]] = why != FinishReason::kNone;
  }
  std::vector<Live> keep;
  keep.reserve(live_.size());
  for (size_t i = 0; i < live_.size(); ++i) {
    if (!finished[i])
      keep.push_back(std::move(live_[i]));
    else if (!live_[i].req.keep_sequence)
      kv.free_sequence(live_[i].seq);
  }
  live_ = std::move(keep);
  return Status::Ok();
}

}  // namespace ferry
