#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {
// One block per row: pass 1 adds the residual and sums squares, pass 2 normalises.
__global__ void add_rmsnorm_kernel(float* __restrict__ x, const float* __restrict__ delta, const bf16* __restrict__ w,
                                   const int32_t* __restrict__ rows, int64_t n_embd, float eps, bf16* __restrict__ out) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t src = rows ? rows[r] : r;
  float* xr = x + src * n_embd;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < n_embd; i += blockDim.x) {
    float v = xr[i];
    if (delta) {
      v += delta[src * n_embd + i];
      xr[i] = v;
    }
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(n_embd) + eps);
  bf16* o = out + r * n_embd;
  for (int64_t i = threadIdx.x; i < n_embd; i += blockDim.x) o[i] = __float2bfloat16(__bfloat162float(w[i]) * (xr[i] * inv));
}
}  // namespace

void add_rmsnorm(float* x, const float* delta, const bf16* w, const int32_t* rows, int64_t n_rows, int64_t n_embd, float eps,
                 bf16* out, cudaStream_t s) {
  if (n_rows == 0) return;
  add_rmsnorm_kernel<<<static_cast<unsigned>(n_rows), 512, 0, s>>>(x, delta, w, rows, n_embd, eps, out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu
