#include "models/weight_format.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

namespace ferry {

namespace {
// The nearest code of v in [-1, 1]: the first code whose upper midpoint is at or above v.
uint8_t nearest_nf4(float v) {
  uint8_t c = 0;
  while (c < 15 && v > 0.5f * (kNf4Codes[c] + kNf4Codes[c + 1])) ++c;
  return c;
}

}  // namespace

bool weight_format_from_name(std::string_view name, WeightFormat* out) {
  for (WeightFormat f : kWeightFormats) {
    if (weight_format_info(f).name == name) {
      *out = f;
      return true;
    }
  }
  return false;
}

WeightFormat weight_format_of(DType t) {
  for (WeightFormat f : kWeightFormats)
    if (weight_format_info(f).dtype == t) return f;
  FERRY_CHECK_MSG(false, "weight_format_of: not a weight format's dtype");
  return WeightFormat::kBF16;
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

void quantize_rows(DType t, const float* x, int64_t rows, int64_t cols, int64_t r0, int64_t r1, uint8_t* blob, float* stage) {
  FERRY_CHECK(cols % quant_col_multiple(t) == 0 && r0 <= r1 && r1 <= rows);
  const QuantLayout l = quant_layout(t, rows, cols);
  float* scales = reinterpret_cast<float*>(blob + l.scales);
  if (t == DType::kNF4DQ) {
    FERRY_CHECK(stage != nullptr);
    quantize_nf4(x, (r1 - r0) * cols, blob + r0 * cols / 2, stage + r0 * cols / 64);
  } else if (t == DType::kNF4) {
    quantize_nf4(x, (r1 - r0) * cols, blob + r0 * cols / 2, scales + r0 * cols / 64);
  } else {
    FERRY_CHECK(t == DType::kQ8);
    quantize_int8_rows(x, r1 - r0, cols, reinterpret_cast<int8_t*>(blob) + r0 * cols, scales + r0);
  }
}

std::vector<std::pair<int64_t, int64_t>> dq_parts(int64_t rows, int64_t cols, const std::vector<int64_t>& part_rows) {
  const int64_t per_row = cols / 64;
  std::vector<std::pair<int64_t, int64_t>> parts;
  int64_t r = 0;
  for (int64_t pr : part_rows) {
    if (pr * per_row % 256 != 0) break;
    parts.emplace_back(r * per_row, (r + pr) * per_row);
    r += pr;
  }
  if (r != rows || parts.empty()) return {{0, (rows * cols + 63) / 64}};
  return parts;
}

void finish_quant(DType t, int64_t rows, int64_t cols, const float* stage, uint8_t* blob, const std::vector<int64_t>& part_rows) {
  if (t != DType::kNF4DQ) return;
  const QuantLayout l = quant_layout(t, rows, cols);
  float* a2 = reinterpret_cast<float*>(blob + l.scales2);
  float* means = reinterpret_cast<float*>(blob + l.means);
  for (auto [a0, a1] : dq_parts(rows, cols, part_rows)) {
    float mean = 0;
    quantize_absmax_dq(stage + a0, a1 - a0, blob + l.scales + a0, a2 + a0 / 256, &mean);
    std::fill(means + a0 / 256, means + (a1 + 255) / 256, mean);
  }
}

void quantize_weight(DType t, const float* x, int64_t rows, int64_t cols, uint8_t* dst) {
  std::memset(dst, 0, static_cast<size_t>(quant_layout(t, rows, cols).bytes));  // the alignment padding too
  std::vector<float> stage(static_cast<size_t>(quant_stage_floats(t, rows, cols)));
  quantize_rows(t, x, rows, cols, 0, rows, dst, stage.data());
  finish_quant(t, rows, cols, stage.data(), dst);
}

void quantize_stored_weight(DType t, const void* w, DType w_dtype, int64_t rows, int64_t cols, uint8_t* blob) {
  std::memset(blob, 0, static_cast<size_t>(quant_layout(t, rows, cols).bytes));  // the alignment padding too
  std::vector<float> stage(static_cast<size_t>(quant_stage_floats(t, rows, cols)));
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, rows, 64), [&](const tbb::blocked_range<int64_t>& r) {
    std::vector<float> x(static_cast<size_t>((r.end() - r.begin()) * cols));
    convert_to_f32(static_cast<const uint8_t*>(w) + r.begin() * cols * static_cast<int64_t>(dtype_size(w_dtype)), w_dtype, x.data(), x.size());
    quantize_rows(t, x.data(), rows, cols, r.begin(), r.end(), blob, stage.data());
  });
  finish_quant(t, rows, cols, stage.data(), blob);
}

void dequantize_rows(DType t, const uint8_t* blob, int64_t rows, int64_t cols, int64_t r0, int64_t r1, float* y) {
  const QuantLayout l = quant_layout(t, rows, cols);
  if (is_nf4(t)) {
    FERRY_CHECK(cols % 64 == 0);  // rows start on a block
    const int64_t i0 = r0 * cols / 64, n = (r1 - r0) * cols / 64;
    const float* absmax = reinterpret_cast<const float*>(blob + l.scales) + i0;
    std::vector<float> dq;
    if (t == DType::kNF4DQ) {  // map[code] * absmax2 + mean, each block of 256 its own pair
      const float* map = dynamic_map_signed();
      const float* a2 = reinterpret_cast<const float*>(blob + l.scales2);
      const float* means = reinterpret_cast<const float*>(blob + l.means);
      dq.resize(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) dq[i] = map[blob[l.scales + i0 + i]] * a2[(i0 + i) / 256] + means[(i0 + i) / 256];
      absmax = dq.data();
    }
    dequantize_nf4(blob + r0 * cols / 2, absmax, (r1 - r0) * cols, y);
  } else {
    FERRY_CHECK(t == DType::kQ8);
    const float* scales = reinterpret_cast<const float*>(blob + l.scales);
    const int8_t* q = reinterpret_cast<const int8_t*>(blob);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cols; ++c) y[(r - r0) * cols + c] = static_cast<float>(q[r * cols + c]) * scales[r];
  }
}

}  // namespace ferry
