// Engine: continuous batching, one step at a time, for requests that arrive while others run.
// Up to `batch` sequences are live; each step runs every live sequence through every layer
// (layer-outer, sequence-inner: one weight load, streamed or resident, serves the whole batch,
// FlexGen's zig-zag order), with decode tokens first and newly admitted prompts' prefill chunks
// filling the rest of the step's token budget. A request is admitted when a batch slot and KV
// blocks for its whole length (prompt + max tokens) are free, so a running sequence never runs out
// of blocks; when one finishes or is cancelled its blocks go to the next request in the queue. With
// a disk tier (KvCache::enable_disk) requests are admitted against host and disk blocks together,
// and each step runs the live sequences whose blocks fit in host memory at once (those already
// there first, then the longest-waiting); blocks of sequences left out spill to disk, coldest first,
// when others need the room.
//
// Each request carries its own sampling parameters and seed. The engine is driven by one thread:
// submit(), cancel() and step() are not safe to call concurrently (runtime/server.h puts a queue in
// front of it). serve() (runtime/serve.h) runs a fixed list of requests through it.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/runner.h"
#include "runtime/sampler.h"

namespace ferry {

struct EngineRequest {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 128;
  SamplingParams sampling;
  bool stop_at_eos = true;             // the model's EOS ids end the request
  std::vector<int32_t> stop_ids;       // more ids that end it (a chat format's end of turn)
  // A conversation's next turn: keep_sequence leaves the request's K/V in the cache when it ends
  // (EngineEvent::kept_seq names the sequence; the caller owns it from then on: continue it, or
  // drop_sequence it). continue_seq names such a sequence whose first continue_len tokens are the
  // prompt's first ones (the caller knows which tokens it holds: the prompt and every generated
  // token but the last); only the rest of the prompt is prefilled. continue_len < prompt.size().
  bool keep_sequence = false;
  int32_t continue_seq = -1;
  int64_t continue_len = 0;
  // >= 0: each generated token comes with its log-probability under the model (the raw logits'
  // log softmax: no temperature, top-k or top-p) and this many most likely alternatives.
  int64_t logprobs = -1;
  // Echo: every prompt token after the first comes back as an event (EngineEvent::prompt) with its
  // log-probability given the tokens before it (and `logprobs` alternatives), before the generated
  // ones. Every prompt position is then an output row; it does not share cached prefixes.
  bool prompt_logprobs = false;
};

struct EngineOptions {
  int64_t batch = 64;             // most live sequences
  int64_t max_step_tokens = 2048; // tokens per step (decode tokens + prefill chunks)
  // A prompt that fits in one step is not started in a step that cannot take all of it: it waits
  // for the next step. With K/V on the host, a prompt's later chunks attend on the CPU over its
  // earlier ones (a prefill over hundreds of keys per token), while a prompt that starts and ends in
  // one step attends on the GPU; the trace in notes/kv.md shows the split chunks doubling those
  // steps. Prompts longer than a step are split regardless.
  bool whole_prompts = false;
  // Prefix caching (KvCache::share_prefix; not with a disk tier): every full block of a sequence is
  // registered under a hash of its tokens and all before them, and a new request starts from the
  // longest run of its prompt's leading blocks still cached, prefilling only the rest (at least its
  // last token). Requests that keep or continue a sequence neither share nor register.
  bool prefix_cache = false;
  // Keep EngineStats::step_shapes (one entry a step: a long-running server leaves it off).
  bool record_step_shapes = false;
};

enum class FinishReason { kNone, kEos, kStopId, kLength, kCancelled };

struct EngineStats {
  int64_t steps = 0, prompt_tokens = 0, generated_tokens = 0;
  int64_t cached_prompt_tokens = 0;  // prompt tokens the prefix cache served (not prefilled)
  int64_t peak_live = 0;
  int64_t split_prompts = 0;      // prompts whose prefill spanned more than one step
  // Per step, with EngineOptions::record_step_shapes: tokens, and K/V tokens its attention reads
  // (each sequence's length after the step, once: what a floor of the step's KV traffic counts).
  std::vector<std::pair<int64_t, int64_t>> step_shapes;
};

// What a step produced for one request: a token (finish kNone or the reason the token ended it),
// or, for a cancelled request, token -1 with kCancelled.
struct EngineEvent {
  int64_t id = -1;
  int32_t token = -1;
  FinishReason finish = FinishReason::kNone;
  int32_t kept_seq = -1;  // with keep_sequence, on the event that ends the request: its sequence
  int64_t cached_tokens = 0;  // the request's prompt tokens the prefix cache served
  bool prompt = false;        // an echoed prompt token (EngineRequest::prompt_logprobs), not a generated one
  bool has_logprob = false;   // EngineRequest::logprobs >= 0: logprob and top are set
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;
};

class Engine {
 public:
  Engine(Runner& runner, const EngineOptions& opts);
  ~Engine();

  // Checks the options (the batch against the step's tokens).
  Status validate_options() const;
  // Checks a request against the model and the cache: a non-empty prompt of ids in the
  // vocabulary, max_tokens >= 1, prompt + max_tokens within max_position_embeddings and within the
  // KV blocks the cache holds, valid sampling parameters.
  Status validate(const EngineRequest& r) const;
  // Queues a validated request; returns its id (0, 1, 2, ... in submission order).
  Expected<int64_t> submit(EngineRequest r);
  // Ends a request: a queued one leaves the queue, a live one frees its blocks. The next step()
  // reports it with kCancelled. Unknown or finished ids are ignored.
  void cancel(int64_t id);
  // Frees a sequence a keep_sequence request left (EngineEvent::kept_seq).
  void drop_sequence(int32_t seq);

  // Returns true when no request is queued, live or waiting to be reported cancelled.
  bool idle() const;
  int64_t n_live() const;
  int64_t n_queued() const { return static_cast<int64_t>(queue_.size()); }

  // Admits what fits, runs one step and appends to `events` (cleared first) the tokens drawn, in
  // the order of the step's output rows, then the cancellations. On failure every live and queued
  // request is dropped (the caller fails them) and the engine is idle.
  Status step(std::vector<EngineEvent>& events);

  const EngineStats& stats() const { return stats_; }

 private:
  struct Live;
  void release_all();

  Runner& runner_;
  EngineOptions opts_;
  struct Queued {
    int64_t id;
    EngineRequest req;
  };
  std::vector<Queued> queue_;          // FIFO (front = index 0)
  std::vector<Live> live_;
  std::vector<int64_t> cancelled_;     // ids to report
  int64_t next_id_ = 0;
  uint64_t step_no_ = 0;
  EngineStats stats_;
  StepBatch batch_;
  std::vector<float> logits_;
};

}  // namespace ferry
