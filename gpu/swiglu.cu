#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {
__global__ void swiglu_kernel(const float* __restrict__ gu, int64_t n_ff, bf16* __restrict__ out) {
  pdl_launch_dependents();
  const int64_t t = blockIdx.y;
  const float* g = gu + t * 2 * n_ff;
  const float* u = g + n_ff;
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n_ff; i += gridDim.x * blockDim.x) {
    const float gv = g[i];
    out[t * n_ff + i] = __float2bfloat16(gv / (1.0f + __expf(-gv)) * u[i]);
  }
}
}  // namespace

void swiglu(const float* gate_up, int64_t n, int64_t n_ff, bf16* out, cudaStream_t s) {
  if (n == 0) return;
  dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(n_ff, 256), 64)), static_cast<unsigned>(n));
  swiglu_kernel<<<grid, 256, 0, s>>>(gate_up, n_ff, out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu
