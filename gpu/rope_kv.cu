#include "gpu/rope_kv.cuh"

namespace ferry::gpu {

namespace {
// Grid (n tokens, n_heads + 2 n_kv heads), block head_dim/2 threads: thread i owns the pair (i, i + half).
__global__ void rope_kv_kernel(const float* __restrict__ qkv, const float* __restrict__ qkv_lo, const bf16* __restrict__ bias, const int32_t* __restrict__ pos,
                               const int32_t* __restrict__ row, const float* __restrict__ inv_freq, int64_t n_heads, PagedKv kv,
                               bf16* __restrict__ q) {
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y;
  const int hd = kv.head_dim, half = hd / 2, i = threadIdx.x;
  const int64_t width = (n_heads + 2 * kv.n_kv_heads) * hd;
  const int64_t at = t * width + static_cast<int64_t>(h) * hd + i;
  float a = qkv[at], b = qkv[at + half];
  if (qkv_lo) {
    a += qkv_lo[at];
    b += qkv_lo[at + half];
  }
  rope_emit(t, h, i, a, b, bias, pos, row, inv_freq, n_heads, kv, q);
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
