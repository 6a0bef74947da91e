// Shared by ferry's CUDA code: checked CUDA calls (file:line in the message), bf16 helpers, warp
// and block reductions. Included only by .cu files and GPU-only sources.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "offload/stream_device.h"

namespace ferry::gpu {

// Thrown by CUDA_CHECK; the CLI reports its message and exits 1.
class CudaError : public DeviceError {
 public:
  using DeviceError::DeviceError;
};

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
  throw CudaError(std::string("CUDA error at ") + file + ":" + std::to_string(line) + ": " + what + ": " +
                  cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

}  // namespace ferry::gpu

#define CUDA_CHECK(x)                                                               \
  do {                                                                              \
    cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) ::ferry::gpu::throw_cuda(e_, #x, __FILE__, __LINE__);    \
  } while (0)

// Checks the launch that just happened (configuration errors; asynchronous faults surface later).
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

namespace ferry::gpu {

using bf16 = __nv_bfloat16;

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

#ifdef __CUDACC__  // device helpers: only for nvcc (host C++ includes this header through kernels.h)
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; `scratch` holds at least 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = lane < n_warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

// Programmatic dependent launch (sm_90+; no-ops elsewhere). A kernel launched with the programmatic
// serialization attribute may start while the kernel before it in the stream still runs: it may read
// only data nobody writes (resident weights) before pdl_wait(), which returns once that kernel has
// finished and its writes are visible. pdl_launch_dependents() lets such a successor start now rather
// than when this kernel's last block exits: every kernel that can precede a GEMV calls it first.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#endif  // __CUDACC__

}  // namespace ferry::gpu
