#include "cpu/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <tbb/blocked_range.h>
#include <tbb/blocked_range2d.h>
#include <tbb/parallel_for.h>

#include "cpu/simd.h"

namespace ferry::cpu {

void embedding(const TensorView& table, const int32_t* ids, int64_t n, float* out) {
  const int64_t n_embd = table.shape[1];
  const size_t row_bytes = static_cast<size_t>(n_embd) * dtype_size(table.dtype);
  const uint8_t* base = static_cast<const uint8_t*>(table.data);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t t = r.begin(); t < r.end(); ++t)
      convert_to_f32(base + ids[t] * row_bytes, table.dtype, out + t * n_embd, n_embd);
  });
}

void rmsnorm(const float* x, const TensorView& w, double eps, int64_t n_rows, int64_t n_embd, float* out) {
  std::vector<float> wf(n_embd);
  convert_to_f32(w.data, w.dtype, wf.data(), n_embd);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n_rows), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t i = r.begin(); i < r.end(); ++i) {
      const float* xi = x + i * n_embd;
      float* oi = out + i * n_embd;
      const float mean = sumsq_f32(xi, n_embd) / static_cast<float>(n_embd);
      const float inv = 1.0f / std::sqrt(mean + static_cast<float>(eps));
      for (int64_t j = 0; j < n_embd; ++j) oi[j] = wf[j] * (xi[j] * inv);
    }
  });
}

void rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, const int32_t* positions, const float* inv_freq) {
  const int64_t half = head_dim / 2;
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n_tokens), [&](const tbb::blocked_range<int64_t>& r) {
    std::vector<float> cs(half), sn(half);
    for (int64_t t = r.begin(); t < r.end(); ++t) {
      const float pos = static_cast<float>(positions[t]);
      for (int64_t i = 0; i < half; ++i) {
        const float ang = pos * inv_freq[i];  // float32, as transformers
        cs[i] = std::cos(ang);
        sn[i] = std::sin(ang);
      }
      for (int64_t h = 0; h < n_heads; ++h) {
        float* v = x + (t * n_heads + h) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = v[i], b = v[i + half];
          v[i] = a * cs[i] - b * sn[i];
          v[i + half] = b * cs[i] + a * sn[i];
        }
      }
    }
  });
}

void swiglu(const float* gate, const float* up, int64_t n, float* out) {
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 4096), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t i = r.begin(); i < r.end(); ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  });
}

void take_cols(const float* src, int64_t T, int64_t ld, int64_t c0, int64_t n, float* dst) {
  for (int64_t t = 0; t < T; ++t) std::memcpy(dst + t * n, src + t * ld + c0, static_cast<size_t>(n) * sizeof(float));
}

void put_cols(const float* src, int64_t T, int64_t n, float* dst, int64_t ld, int64_t c0) {
  for (int64_t t = 0; t < T; ++t) std::memcpy(dst + t * ld + c0, src + t * n, static_cast<size_t>(n) * sizeof(float));
}

void add_inplace(float* y, const float* x, int64_t n) {
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, n, 8192), [&](const tbb::blocked_range<int64_t>& r) {
    for (int64_t i = r.begin(); i < r.end(); ++i) y[i] += x[i];
  });
}

}  // namespace ferry::cpu
