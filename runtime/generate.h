// Generation: prefill a batch of prompts (of different lengths, in chunks of at most
// `max_step_tokens` tokens), then decode them together one token per sequence per step until each
// has `n_predict` tokens or hits EOS.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "runtime/runner.h"
#include "runtime/sampler.h"

namespace ferry {

struct GenerateOptions {
  int64_t n_predict = 128;
  SamplingParams sampling;
  int64_t max_step_tokens = 512;
  bool stop_at_eos = true;
};

struct GenerateResult {
  std::vector<std::vector<int32_t>> tokens;  // generated ids per prompt
  int64_t n_prompt_tokens = 0;
  int64_t n_decode_steps = 0;
  int64_t n_generated = 0;
  double prefill_ms = 0;
  double decode_ms = 0;
};

// Called with (prompt index, token) as each token is chosen.
using TokenCallback = std::function<void(int64_t, int32_t)>;

Expected<GenerateResult> generate(Runner& runner, const std::vector<std::vector<int32_t>>& prompts, const GenerateOptions& opts,
                                  const TokenCallback& on_token = {});

// Runs `ids` through a fresh sequence and returns logits at every position [n, n_vocab].
Expected<std::vector<float>> prompt_logits(Runner& runner, const std::vector<int32_t>& ids, int64_t max_step_tokens = 512);

// Returns the KV blocks needed for sequences of the given total lengths.
int64_t kv_blocks_needed(const std::vector<int64_t>& lengths, int64_t block_size);

}  // namespace ferry
