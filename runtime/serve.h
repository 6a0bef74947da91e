// Throughput mode: many requests through one runner with continuous batching. Up to `batch`
// sequences are live; each step runs every live sequence through every layer (layer-outer,
// sequence-inner: one weight load, streamed or resident, serves the whole batch, FlexGen's zig-zag
// order), with decode tokens first and newly admitted prompts' prefill chunks filling the rest of
// the step's token budget. A request is admitted when a batch slot and KV blocks for its whole
// length (prompt + max tokens) are free, so a running sequence never runs out of blocks; when one
// finishes its blocks go to the next request in the queue. With a disk tier (KvCache::enable_disk)
// requests are admitted against host and disk blocks together, and each step runs the live sequences
// whose blocks fit in host memory at once (those already there first, then the longest-waiting);
// blocks of sequences left out spill to disk, coldest first, when others need the room.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/runner.h"
#include "runtime/sampler.h"

namespace ferry {

struct ServeRequest {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 128;
};

struct ServeOptions {
  int64_t batch = 64;             // most live sequences
  int64_t max_step_tokens = 2048; // tokens per step (decode tokens + prefill chunks)
  SamplingParams sampling;
  bool stop_at_eos = true;
  // A prompt that fits in one step is not started in a step that cannot take all of it: it waits
  // for the next step. With K/V on the host, a prompt's later chunks attend on the CPU over its
  // earlier ones (a prefill over hundreds of keys per token), while a prompt that starts and ends in
  // one step attends on the GPU; the trace in notes/kv.md shows the split chunks doubling those
  // steps. Prompts longer than a step are split regardless.
  bool whole_prompts = false;
  // Checked before every step: once true, serve() stops (the requests finished so far keep their
  // results, marked `finished`) and returns with stats.interrupted. The CLI sets it on SIGINT/SIGTERM.
  const std::atomic<bool>* stop = nullptr;
};

struct ServeResult {
  std::vector<int32_t> tokens;    // generated ids
  bool hit_eos = false;
  bool finished = false;          // ran to EOS or max_tokens (false: interrupted before)
  double ttft_ms = 0;             // from the start of serve() to the first generated token
  double latency_ms = 0;          // from the start of serve() to the last
  double admitted_ms = 0;         // when it entered the batch
};

struct ServeStats {
  int64_t n_requests = 0, prompt_tokens = 0, generated_tokens = 0, steps = 0;
  int64_t peak_live = 0;
  int64_t split_prompts = 0;      // prompts whose prefill spanned more than one step
  int64_t blocks_spilled = 0, blocks_restored = 0;  // K/V blocks written to and read from the disk tier
  bool interrupted = false;       // ServeOptions::stop ended the run early
  double total_ms = 0;
  double ttft_mean_ms = 0, ttft_p50_ms = 0, ttft_p90_ms = 0;
  // Per step: tokens, and K/V tokens its attention reads (each sequence's length after the step,
  // once: what a floor of the step's KV traffic counts).
  std::vector<std::pair<int64_t, int64_t>> step_shapes;
};

// Called as each request finishes (index into `requests`), and after every step with progress.
using ServeDone = std::function<void(int64_t, const ServeResult&)>;
using ServeProgress = std::function<void(int64_t done, int64_t total, int64_t generated, double elapsed_ms)>;

// Serves every request; results[i] answers requests[i].
Expected<ServeStats> serve(Runner& runner, const std::vector<ServeRequest>& requests, const ServeOptions& opts, std::vector<ServeResult>& results,
                           const ServeDone& on_done = {}, const ServeProgress& on_progress = {});

}  // namespace ferry
