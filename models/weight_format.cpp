#include "models/weight_format.h"

#include <algorithm>
#include <cmath>

namespace ferry {

namespace {
// The nearest code of v in [-1, 1]: the first code whose upper midpoint is at or above v.
uint8_t nearest_nf4(float v) {
  uint8_t c = 0;
  while (c < 15 && v > 0.5f * (kNf4Codes[c] + kNf4Codes[c + 1])) ++c;
  return c;
}
}  // namespace

void quantize_nf4(const float* x, int64_t n, uint8_t* packed, float* absmax) {
  constexpr int64_t kBlock = 64;
  std::fill(packed, packed + (n + 1) / 2, uint8_t{0});
  for (int64_t b0 = 0, bi = 0; b0 < n; b0 += kBlock, ++bi) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    float m = 0;
    for (int64_t i = b0; i < b1; ++i) m = std::max(m, std::fabs(x[i]));
    absmax[bi] = m;
    const float inv = m > 0 ? 1.0f / m : 0.0f;
    for (int64_t i = b0; i < b1; ++i) {
      const uint8_t c = m > 0 ? nearest_nf4(x[i] * inv) : uint8_t{7};
      packed[i / 2] |= static_cast<uint8_t>(i % 2 == 0 ? c << 4 : c);
    }
  }
}

void dequantize_nf4(const uint8_t* packed, const float* absmax, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t c = i % 2 == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 0x0f;
    y[i] = kNf4Codes[c] * absmax[i / 64];
  }
}

}  // namespace ferry
