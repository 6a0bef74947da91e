#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {
__global__ void embedding_kernel(const bf16* __restrict__ table, const int32_t* __restrict__ ids, int64_t n_embd, float* __restrict__ x) {
  const int64_t t = blockIdx.x;
  const bf16* src = table + static_cast<int64_t>(ids[t]) * n_embd;
  float* dst = x + t * n_embd;
  for (int64_t i = threadIdx.x; i < n_embd; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
}
}  // namespace

void embedding(const bf16* table, const int32_t* ids, int64_t n, int64_t n_embd, float* x, cudaStream_t s) {
  if (n == 0) return;
  embedding_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(table, ids, n_embd, x);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu
