#include "gpu/device.h"

namespace ferry::gpu {

bool built_with_cuda() { return false; }
int64_t driver_used_bytes() { return -1; }
GpuRates measure_gpu_rates() {
  GpuRates r;
  r.error = "built without CUDA";
  return r;
}

SharedCopyRate h2d_during(const std::function<void()>&, double) {
  SharedCopyRate r;
  r.error = "built without CUDA";
  return r;
}

GpuInfo probe() {
  GpuInfo info;
  info.why_none = "ferry was built without CUDA (-DFERRY_CUDA=OFF or no nvcc)";
  return info;
}

}  // namespace ferry::gpu
