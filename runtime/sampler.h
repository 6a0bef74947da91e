// Sampler: picks the next token from a row of logits. Greedy when temperature is 0; otherwise
// top-k, then temperature softmax, then top-p (nucleus), then a draw from a seeded generator, so the
// same seed gives the same text.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "runtime/status.h"

namespace ferry {

struct SamplingParams {
  float temperature = 0.8f;  // 0: greedy
  int64_t top_k = 40;        // 0: all tokens
  float top_p = 0.95f;       // 1: no nucleus cut
  uint64_t seed = 0;

  // Checks the ranges; names the flag (--temp, --top-k, --top-p).
  Status validate() const;
};

// Returns the index of the largest logit (the lowest index on ties).
int32_t argmax(const float* logits, int64_t n);

// Returns log softmax(logits)[token], the model's own log-probability (no temperature, top-k or
// top-p), and with `top` the `k` most likely ids with theirs, most likely first.
float token_logprob(const float* logits, int64_t n, int32_t token, int64_t k = 0, std::vector<std::pair<int32_t, float>>* top = nullptr);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) {}
  int32_t sample(const float* logits, int64_t n_vocab);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

}  // namespace ferry
