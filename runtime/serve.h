// Throughput mode: a fixed list of requests through the continuous-batching Engine
// (runtime/engine.h), with per-request timings and a way to stop early.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/engine.h"
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
  SamplingParams sampling;         // request i draws with seed sampling.seed + i
  bool stop_at_eos = true;
  bool whole_prompts = false;      // EngineOptions::whole_prompts
  bool prefix_cache = false;       // EngineOptions::prefix_cache
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
};

// The engine's counts (step_shapes recorded), and the run's.
struct ServeStats : EngineStats {
  int64_t n_requests = 0;
  int64_t blocks_spilled = 0, blocks_restored = 0;  // K/V blocks written to and read from the disk tier
  bool interrupted = false;       // ServeOptions::stop ended the run early
  double total_ms = 0;
  double ttft_mean_ms = 0, ttft_p50_ms = 0, ttft_p90_ms = 0;
};

// Called as each request finishes (index into `requests`), and after every step with progress.
using ServeDone = std::function<void(int64_t, const ServeResult&)>;
using ServeProgress = std::function<void(int64_t done, int64_t total, int64_t generated, double elapsed_ms)>;

// Serves every request; results[i] answers requests[i].
Expected<ServeStats> serve(Runner& runner, const std::vector<ServeRequest>& requests, const ServeOptions& opts, std::vector<ServeResult>& results,
                           const ServeDone& on_done = {}, const ServeProgress& on_progress = {});

}  // namespace ferry
