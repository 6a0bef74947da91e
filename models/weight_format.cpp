#include "models/weight_format.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace ferry {

namespace {
// The nearest code of v in [-1, 1]: the first code whose upper midpoint is at or above v.
uint8_t nearest_nf4(float v) {
  uint8_t c = 0;
  while (c < 15 && v > 0.5f * (kNf4Codes[c] + kNf4Codes[c + 1])) ++c;
  return c;
}

// bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8).
std::vector<float> make_dynamic_map() {
  std::vector<float> data;
  const int max_exp = 7, total = 8, non_sign = total - 1;  // signed
  const int additional = total - max_exp;                   // 1
  for (int i = 0; i < max_exp; ++i) {
    const int fraction_items = (1 << (i + non_sign - max_exp)) + 1;  // 2^(i + 0) + 1
    std::vector<double> bounds(fraction_items);
    for (int k = 0; k < fraction_items; ++k) bounds[k] = 0.1 + 0.9 * k / (fraction_items - 1);  // linspace(0.1, 1)
    for (int k = 0; k + 1 < fraction_items; ++k) {
      const double mean = 0.5 * (bounds[k] + bounds[k + 1]);
      const double v = std::pow(10.0, -(max_exp - 1) + i) * mean;
      data.push_back(static_cast<float>(v));
      data.push_back(static_cast<float>(-v));
    }
  }
  (void)additional;
  data.push_back(0.0f);
  data.push_back(1.0f);
  while (data.size() < 256) data.push_back(0.0f);  // bitsandbytes pads with zeros
  std::sort(data.begin(), data.end());
  return data;
}
}  // namespace

bool weight_format_from_name(std::string_view name, WeightFormat* out) {
  for (WeightFormat f : {WeightFormat::kBF16, WeightFormat::kNF4, WeightFormat::kInt8}) {
    if (weight_format_info(f).name == name) {
      *out = f;
      return true;
    }
  }
  return false;
}

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

void quantize_int8_rows(const float* x, int64_t rows, int64_t cols, int8_t* q, float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    float m = 0;
    for (int64_t c = 0; c < cols; ++c) m = std::max(m, std::fabs(xr[c]));
    scale[r] = m / 127.0f;
    const float inv = m > 0 ? 127.0f / m : 0.0f;
    for (int64_t c = 0; c < cols; ++c) q[r * cols + c] = static_cast<int8_t>(std::clamp(std::nearbyint(xr[c] * inv), -127.0f, 127.0f));
  }
}

const float* dynamic_map_signed() {
  static const std::vector<float> map = make_dynamic_map();
  return map.data();
}

void quantize_absmax_dq(const float* absmax, int64_t n, uint8_t* codes, float* absmax2, float* offset) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += absmax[i];
  const float off = n > 0 ? static_cast<float>(sum / static_cast<double>(n)) : 0.0f;
  *offset = off;
  const float* map = dynamic_map_signed();
  for (int64_t b0 = 0, bi = 0; b0 < n; b0 += 256, ++bi) {
    const int64_t b1 = std::min(n, b0 + 256);
    float m = 0;
    for (int64_t i = b0; i < b1; ++i) m = std::max(m, std::fabs(absmax[i] - off));
    absmax2[bi] = m;
    for (int64_t i = b0; i < b1; ++i) {
      const float v = m > 0 ? (absmax[i] - off) / m : 0.0f;
      // Nearest code (the map is ascending): binary search, then the closer neighbour.
      const float* hi = std::lower_bound(map, map + 256, v);
      int64_t c = hi - map;
      if (c == 256) c = 255;
      else if (c > 0 && std::fabs(map[c - 1] - v) <= std::fabs(map[c] - v)) c = c - 1;
      codes[i] = static_cast<uint8_t>(c);
    }
  }
}

void dequantize_absmax_dq(const uint8_t* codes, const float* absmax2, float offset, int64_t n, float* absmax) {
  const float* map = dynamic_map_signed();
  for (int64_t i = 0; i < n; ++i) absmax[i] = map[codes[i]] * absmax2[i / 256] + offset;
}

void quantize_weight(DType t, const float* x, int64_t rows, int64_t cols, uint8_t* dst) {
  std::memset(dst, 0, static_cast<size_t>(quant_layout(t, rows, cols).bytes));  // the alignment padding too
  quantize_rows(t, x, rows, cols, 0, rows, dst);
}

void quantize_rows(DType t, const float* x, int64_t rows, int64_t cols, int64_t r0, int64_t r1, uint8_t* blob) {
  FERRY_CHECK(cols % quant_col_multiple(t) == 0 && r0 <= r1 && r1 <= rows);
  const QuantLayout l = quant_layout(t, rows, cols);
  float* scales = reinterpret_cast<float*>(blob + l.scales);
  if (t == DType::kNF4) {
    quantize_nf4(x, (r1 - r0) * cols, blob + r0 * cols / 2, scales + r0 * cols / 64);
  } else {
    FERRY_CHECK(t == DType::kQ8);
    quantize_int8_rows(x, r1 - r0, cols, reinterpret_cast<int8_t*>(blob) + r0 * cols, scales + r0);
  }
}

void dequantize_rows(DType t, const uint8_t* blob, int64_t rows, int64_t cols, int64_t r0, int64_t r1, float* y) {
  const QuantLayout l = quant_layout(t, rows, cols);
  const float* scales = reinterpret_cast<const float*>(blob + l.scales);
  if (t == DType::kNF4) {
    FERRY_CHECK(cols % 64 == 0);  // rows start on a block
    dequantize_nf4(blob + r0 * cols / 2, scales + r0 * cols / 64, (r1 - r0) * cols, y);
  } else {
    FERRY_CHECK(t == DType::kQ8);
    const int8_t* q = reinterpret_cast<const int8_t*>(blob);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) y[(r - r0) * cols + c] = static_cast<float>(q[r * cols + c]) * scales[r];
  }
}

}  // namespace ferry
