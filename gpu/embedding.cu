#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {
__global__ void embedding_kernel(const bf16* __restrict__ table, const int32_t* __restrict__ ids, int64_t n_embd, float* __restrict__ x) {
  const int64_t t = blockIdx.x;
  const bf16* src = table + static_cast<int64_t>(ids[t]) * n_embd;
  float* dst = x + t * n_embd;
  for (int64_t i = threadIdx.x; i < n_embd; i += blockDim.x) dst[i] = __bfloat162float(src[i]);
}

// The same, 8 elements a thread with 16-byte loads (n_embd a multiple of 8, the table 16-byte
// aligned): a table in pinned host memory is read over PCIe in requests that size.
__global__ void embedding_kernel8(const bf16* __restrict__ table, const int32_t* __restrict__ ids, int64_t n_embd, float* __restrict__ x) {
  const int64_t t = blockIdx.x;
  const uint4* src = reinterpret_cast<const uint4*>(table + static_cast<int64_t>(ids[t]) * n_embd);
  float4* dst = reinterpret_cast<float4*>(x + t * n_embd);
  for (int64_t i = threadIdx.x; i < n_embd / 8; i += blockDim.x) {
    const uint4 v = src[i];
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    float f[8];
    for (int j = 0; j < 4; ++j) {
      f[2 * j] = __uint_as_float(w[j] << 16);
      f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
    dst[2 * i] = make_float4(f[0], f[1], f[2], f[3]);
    dst[2 * i + 1] = make_float4(f[4], f[5], f[6], f[7]);
  }
}
}  // namespace

void embedding(const bf16* table, const int32_t* ids, int64_t n, int64_t n_embd, float* x, cudaStream_t s) {
  if (n == 0) return;
  if (n_embd % 8 == 0 && reinterpret_cast<uintptr_t>(table) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0)
    embedding_kernel8<<<static_cast<unsigned>(n), 128, 0, s>>>(table, ids, n_embd, x);
  else
    embedding_kernel<<<static_cast<unsigned>(n), 256, 0, s>>>(table, ids, n_embd, x);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu
