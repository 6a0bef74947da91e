// CPU element-wise and row ops in float32, each parallel over rows with oneTBB. Every op here has a
// scalar reference in tests/test_ops.cpp and, later, a GPU twin checked against it.
#pragma once

#include <cstdint>

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

// y[i] += x[i] over n elements.
void add_inplace(float* y, const float* x, int64_t n);

// Causal attention for a step. q [n_tokens, n_heads, head_dim] (RoPE applied), K/V already
// appended to `kv` for every token of the step. For token t of sequence s at position p it attends
// to positions [max(0, p - window + 1), p] of s (window 0: all). out [n_tokens, n_heads, head_dim].
// Per (token, KV head) every K/V row is read once for the whole group of query heads; online
// softmax, float32.
void attention(const float* q, int64_t n_tokens, const int32_t* positions, const int32_t* seq_ids, int64_t n_heads,
               int64_t window, int64_t il, const KvCache& kv, float* out);

}  // namespace ferry::cpu
