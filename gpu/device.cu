#include "gpu/device.h"

#include <cuda_runtime.h>

namespace ferry::gpu {

bool built_with_cuda() { return true; }

int64_t driver_used_bytes() {
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  return static_cast<int64_t>(total_b - free_b);
}

GpuInfo probe() {
  GpuInfo info;
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    info.why_none = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls are not confused by it
    return info;
  }
  if (n == 0) {
    info.why_none = "no CUDA devices";
    return info;
  }
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) {
    info.why_none = "cannot read device 0's properties";
    return info;
  }
  info.n_devices = n;
  info.name = p.name;
  info.total_bytes = static_cast<int64_t>(p.totalGlobalMem);
  info.cc_major = p.major;
  info.cc_minor = p.minor;
  return info;
}

}  // namespace ferry::gpu
