#include "models/weight_format.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace ferry {

namespace {
// The nearest code of v in [-1, 1]: the first code whose upper midpoint is at or above v.
uint8_t nearest_nf4(float v) {
  uint8_t c = 0;
  while (c < 15 && v > 0.5f * (kNf4Codes[c] + kNf4Codes[c + 1])) ++c;
  return c;
}

// bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), the
// float32 values it returns (bitsandbytes 0.50.2): its formula evaluated in double differs from them
// in the last bit of 72 values, because bitsandbytes computes the linspace and the means in float32.
// tests/data/bnb_nf4_dq.safetensors holds bitsandbytes' own table, which the tests compare.
constexpr float kDynamicMapSigned[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f, -0x1.d86666p-1f,
    -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f,
    -0x1.7accccp-1f, -0x1.73999ap-1f, -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f,
    -0x1.246668p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f,
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f, -0x1.b8ccccp-2f, -0x1.aa6666p-2f,
    -0x1.9cp-2f, -0x1.8d9998p-2f, -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f, -0x1.0cp-2f, -0x1.fb3332p-3f,
    -0x1.de6666p-3f, -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f, -0x1.93d70ap-4f, -0x1.8851eep-4f,
    -0x1.7ccccep-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f, -0x1.09999ap-4f, -0x1.fc28f6p-5f,
    -0x1.e51ebap-5f, -0x1.ce147ap-5f, -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f, -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f,
    -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, -0x1.e978d4p-8f, -0x1.c49ba6p-8f,
    -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f,
    -0x1.78d5p-11f, -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f, -0x1.b43528p-19f,
    -0x1.27476ep-21f, 0.0f, 0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f,
    0x1.02de02p-11f, 0x1.3dd982p-11f, 0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f,
    0x1.56041ap-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f, 0x1.d1eb86p-7f, 0x1.170a3ep-6f,
    0x1.451ebap-6f, 0x1.733334p-6f, 0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f,
    0x1.b70a3ep-5f, 0x1.ce147ap-5f, 0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb854p-4f, 0x1.5a3d7p-4f,
    0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f,
    0x1.a4ccccp-3f, 0x1.c1999ap-3f, 0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f, 0x1.626666p-2f, 0x1.70ccccp-2f,
    0x1.7f3334p-2f, 0x1.8d9998p-2f, 0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f, 0x1.079998p-1f, 0x1.0eccccp-1f,
    0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f, 0x1.653334p-1f,
    0x1.6c6668p-1f, 0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f, 0x1.bb999ap-1f,
    0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1.0p+0f,
};
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

const float* dynamic_map_signed() { return kDynamicMapSigned; }

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
