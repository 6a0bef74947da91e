// RoPE + K/V append for one rotary pair, shared by rope_kv.cu's kernel and the QKV GEMV's epilogue
// (gemv.cu). Included only by .cu files.
#pragma once

#include "gpu/kernels.h"

namespace ferry::gpu {

// Token t, head h (q heads, then k heads, then v heads: head h's columns start at h * head_dim),
// pair (i, i + head_dim / 2) with values (a, b) before the bias: adds the bias, rotates q and k
// (rotate-half form, angle pos[t] * inv_freq[i]), and writes q to `q` [n, n_heads, head_dim] and
// k / v to the paged cache at (row[t], pos[t]); with kv.k null, q, k and v side by side in `q`
// [n, q_dim + 2 kv_dim].
__device__ __forceinline__ void rope_emit(int64_t t, int h, int i, float a, float b, const bf16* __restrict__ bias,
                                          const int32_t* __restrict__ pos, const int32_t* __restrict__ row,
                                          const float* __restrict__ inv_freq, int64_t n_heads, const PagedKv& kv,
                                          bf16* __restrict__ q) {
  const int hd = kv.head_dim, half = hd / 2;
  const int64_t q_dim = n_heads * hd, kv_dim = static_cast<int64_t>(kv.n_kv_heads) * hd;
  const int64_t col = static_cast<int64_t>(h) * hd;
  if (bias) {
    a += __bfloat162float(bias[col + i]);
    b += __bfloat162float(bias[col + i + half]);
  }
  const bool is_v = h >= n_heads + kv.n_kv_heads;
  if (!is_v) {
    float sn, cs;
    sincosf(static_cast<float>(pos[t]) * inv_freq[i], &sn, &cs);
    const float ra = a * cs - b * sn, rb = b * cs + a * sn;
    a = ra;
    b = rb;
  }
  bf16* dst;
  if (kv.k == nullptr) {  // K/V go to the host: q, k, v side by side
    dst = q + t * (q_dim + 2 * kv_dim) + col;
  } else if (h < n_heads) {
    dst = q + t * q_dim + col;
  } else {
    const int p = pos[t];
    const int32_t block = kv.block_tables[static_cast<int64_t>(row[t]) * kv.max_blocks + p / kv.block_size];
    const int kh = is_v ? h - static_cast<int>(n_heads) - kv.n_kv_heads : h - static_cast<int>(n_heads);
    dst = (is_v ? kv.v : kv.k) + ((static_cast<int64_t>(block) * kv.block_size + p % kv.block_size) * kv.n_kv_heads + kh) * hd;
  }
  dst[i] = __float2bfloat16(a);
  dst[i + half] = __float2bfloat16(b);
}

}  // namespace ferry::gpu
