#include "gpu/kernels.h"

#include <algorithm>

#include <cuda_fp16.h>

namespace ferry::gpu {

namespace {
__global__ void to_bf16_kernel(const void* __restrict__ src, int dtype, int64_t n, bf16* __restrict__ dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v;
    if (dtype == 0) v = static_cast<const float*>(src)[i];
    else if (dtype == 1) v = __half2float(static_cast<const __half*>(src)[i]);
    else v = __bfloat162float(static_cast<const bf16*>(src)[i]);
    dst[i] = __float2bfloat16(v);
  }
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Bit-for-bit the host generator: no contraction into FMA (the host rounds each step).
__global__ void synthetic_kernel(uint64_t key, float a, bool is_norm, int64_t n, int64_t first, bf16* __restrict__ dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = splitmix64(key ^ (static_cast<uint64_t>(first + i) * 0xd1342543de82ef95ull));
    const float u = __fsub_rn(__fmul_rn(__fmul_rn(static_cast<float>(h >> 40), 1.0f / 16777216.0f), 2.0f), 1.0f);
    const float au = __fmul_rn(a, u);
    dst[i] = __float2bfloat16_rn(is_norm ? __fadd_rn(1.0f, au) : au);
  }
}
}  // namespace

void to_bf16(const void* src, int dtype, int64_t n, bf16* dst, cudaStream_t s) {
  if (n == 0) return;
  to_bf16_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 65535)), 256, 0, s>>>(src, dtype, n, dst);
  CUDA_CHECK_LAUNCH();
}

void synthetic_fill(uint64_t key, float scale, bool is_norm, int64_t n, bf16* dst, cudaStream_t s, int64_t first) {
  if (n == 0) return;
  synthetic_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 65535)), 256, 0, s>>>(key, scale, is_norm, n, first, dst);
  CUDA_CHECK_LAUNCH();
}

namespace {
// Words of 16 bytes, then the last bytes % 16 one byte at a time (by the first block).
__global__ void copy16_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, int64_t n, int tail) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) dst[i] = src[i];
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < tail)
    reinterpret_cast<uint8_t*>(dst + n)[threadIdx.x] = reinterpret_cast<const uint8_t*>(src + n)[threadIdx.x];
}
}  // namespace

void copy_by_kernel(const void* src, void* dst, int64_t bytes, cudaStream_t s) {
  if (bytes <= 0) return;
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDefault, s));
    return;
  }
  const int64_t n = bytes / 16;
  const int blocks = static_cast<int>(std::clamp<int64_t>((n + 255) / 256, 1, 264));
  copy16_kernel<<<blocks, 256, 0, s>>>(static_cast<const uint4*>(src), static_cast<uint4*>(dst), n, static_cast<int>(bytes % 16));
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu
