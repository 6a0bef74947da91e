#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {
// Grid (n tokens, n_heads + 2 n_kv heads), block head_dim/2 threads: thread i owns the pair (i, i + half).
__global__ void rope_kv_kernel(const float* __restrict__ qkv, const float* __restrict__ qkv_lo, const bf16* __restrict__ bias, const int32_t* __restrict__ pos,
                               const int32_t* __restrict__ row, const float* __restrict__ inv_freq, int64_t n_heads, PagedKv kv,
                               bf16* __restrict__ q) {
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y;
  const int hd = kv.head_dim, half = hd / 2, i = threadIdx.x;
  const int64_t q_dim = n_heads * hd, kv_dim = static_cast<int64_t>(kv.n_kv_heads) * hd;
  const int64_t width = q_dim + 2 * kv_dim;
  const int64_t col = h < n_heads ? h * hd : h < n_heads + kv.n_kv_heads ? q_dim + (h - n_heads) * hd : q_dim + kv_dim + (h - n_heads - kv.n_kv_heads) * hd;
  const float* src = qkv + t * width + col;
  float a = src[i], b = src[i + half];
  if (qkv_lo) {
    a += qkv_lo[t * width + col + i];
    b += qkv_lo[t * width + col + i + half];
  }
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
  if (kv.k == nullptr) {  // K/V go to the host: q, k, v side by side in `q` [n, q_dim + 2 kv_dim]
    bf16* dst = q + t * width + col;
    dst[i] = __float2bfloat16(a);
    dst[i + half] = __float2bfloat16(b);
    return;
  }
  if (h < n_heads) {
    bf16* dst = q + t * q_dim + h * hd;
    dst[i] = __float2bfloat16(a);
    dst[i + half] = __float2bfloat16(b);
    return;
  }
  const int p = pos[t];
  const int32_t block = kv.block_tables[static_cast<int64_t>(row[t]) * kv.max_blocks + p / kv.block_size];
  const int kh = is_v ? h - n_heads - kv.n_kv_heads : h - n_heads;
  const int64_t off = ((static_cast<int64_t>(block) * kv.block_size + p % kv.block_size) * kv.n_kv_heads + kh) * hd;
  bf16* dst = (is_v ? kv.v : kv.k) + off;
  dst[i] = __float2bfloat16(a);
  dst[i + half] = __float2bfloat16(b);
}
}  // namespace

void rope_kv_append(const float* qkv, const float* qkv_lo, const bf16* bias, const int32_t* pos, const int32_t* row, const float* inv_freq, int64_t n,
                    int64_t n_heads, const PagedKv& kv, bf16* q, cudaStream_t s) {
  if (n == 0) return;
  dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(n_heads + 2 * kv.n_kv_heads));
  rope_kv_kernel<<<grid, kv.head_dim / 2, 0, s>>>(qkv, qkv_lo, bias, pos, row, inv_freq, n_heads, kv, q);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu
