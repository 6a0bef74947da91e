#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>

namespace ferry {

Status SamplingParams::validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature))
    return invalid_argument(strprintf("--temp must be a number >= 0 (got %g)", temperature));
  if (top_k < 0) return invalid_argument(strprintf("--top-k must be >= 0 (got %lld)", static_cast<long long>(top_k)));
  if (!(top_p > 0.0f && top_p <= 1.0f)) return invalid_argument(strprintf("--top-p must be in (0, 1] (got %g)", top_p));
  return Status::Ok();
}

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

float token_logprob(const float* logits, int64_t n, int32_t token, int64_t k, std::vector<std::pair<int32_t, float>>* top) {
  float mx = logits[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i] - mx));
  const double lse = static_cast<double>(mx) + std::log(sum);
  if (top) top->clear();
  if (top && k > 0) {
    k = std::min(k, n);
    std::vector<int32_t> idx(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) idx[i] = static_cast<int32_t>(i);
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
    for (int64_t i = 0; i < k; ++i) top->push_back({idx[i], static_cast<float>(logits[idx[i]] - lse)});
  }
  return static_cast<float>(logits[token] - lse);
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  if (p_.temperature == 0.0f) return argmax(logits, n);
  cand_.resize(n);
  for (int64_t i = 0; i < n; ++i) cand_[i] = {logits[i], static_cast<int32_t>(i)};
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  int64_t k = (p_.top_k > 0 && p_.top_k < n) ? p_.top_k : n;
  std::partial_sort(cand_.begin(), cand_.begin() + k, cand_.end(), by_logit);
  cand_.resize(k);
  // Softmax at temperature over the k candidates (sorted, so the first is the max).
  const float mx = cand_[0].first;
  double sum = 0;
  for (auto& c : cand_) {
    c.first = static_cast<float>(std::exp((c.first - mx) / p_.temperature));
    sum += c.first;
  }
  // Nucleus: the smallest prefix whose probability reaches top_p.
  double cum = 0;
  size_t keep = cand_.size();
  for (size_t i = 0; i < cand_.size(); ++i) {
    cum += cand_[i].first / sum;
    if (cum >= p_.top_p) {
      keep = i + 1;
      break;
    }
  }
  cand_.resize(keep);
  double total = 0;
  for (const auto& c : cand_) total += c.first;
  std::uniform_real_distribution<double> u(0.0, total);
  double r = u(rng_);
  for (const auto& c : cand_) {
    r -= c.first;
    if (r <= 0) return c.second;
  }
  return cand_.back().second;
}

}  // namespace ferry
