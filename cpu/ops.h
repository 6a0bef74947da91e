// CPU element-wise and row ops in float32, each parallel over rows with oneTBB. Every op here has a
// scalar reference in tests/test_ops.cpp and, later, a GPU twin checked against it.
#pragma once

#include <cstdint>

#include "cpu/attention.h"
#include "offload/kv_cache.h"
#include "runtime/tensor.h"

namespace ferry::cpu {

// out[t, :] = float(table[ids[t], :]) for t < n; table is [n_vocab, n_embd] F32/F16/BF16.
void embedding(const TensorView& table, const int32_t* ids, int64_t n, float* out);

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w  for r < n_rows; x and out may alias.
void rmsnorm(const float* x, const TensorView& w, double eps, int64_t n_rows, int64_t n_embd, float* out);

// Rotates pairs (i, i + head_dim/2) of every head in x [n_tokens, n_heads, head_dim] in place
// (Hugging Face's rotate_half form), by angle positions[t] * inv_freq[i].
void rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t head_dim, const int32_t* positions, const float* inv_freq);

// out[t, i] = silu(gate[t, i]) * up[t, i]; out may alias gate.
void swiglu(const float* gate, const float* up, int64_t n, float* out);

// Columns [c0, c0 + n) of src [T, ld] into dst [T, n]; put_cols writes them back into dst [T, ld].
void take_cols(const float* src, int64_t T, int64_t ld, int64_t c0, int64_t n, float* dst);
void put_cols(const float* src, int64_t T, int64_t n, float* dst, int64_t ld, int64_t c0);

// y[i] += x[i] over n elements.
void add_inplace(float* y, const float* x, int64_t n);

// attention(): cpu/attention.h.

}  // namespace ferry::cpu
