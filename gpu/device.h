// GPU discovery, callable from CPU-only code (no CUDA types here). Any error from the driver or
// runtime, such as "driver version is insufficient" on a machine without a GPU, reads as "no GPU".
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace ferry::gpu {

struct GpuInfo {
  int n_devices = 0;
  std::string name;            // of device 0
  int64_t total_bytes = 0;     // of device 0
  int cc_major = 0, cc_minor = 0;
  std::string pci_bus;         // of device 0, "0000:41:00.0" (hwloc's NUMA lookup)
  std::string why_none;        // when n_devices == 0: the runtime's message, or "built without CUDA"
};

// Returns what GPUs this process can use.
GpuInfo probe();
// Returns the bytes in use on device 0 as the driver counts them (total - free), or -1 without a GPU.
int64_t driver_used_bytes();
// Measured GPU rates for `ferry calibrate`: pinned host -> device copies (GB/s), device memory
// copy (bytes read + written, GB/s), and a BF16 GEMM (TFLOP/s). Each is the best of a few runs.
struct GpuRates {
  double h2d_gbs = 0, d2h_gbs = 0, hbm_gbs = 0, gemm_tflops = 0;
  // The decode GEMV at one row over 1 GiB of BF16, NF4, NF4-DQ and int8 weights (K = 8192): bytes of
  // the format read per second.
  double gemv_gbs = 0, gemv_nf4_gbs = 0, gemv_nf4dq_gbs = 0, gemv_q8_gbs = 0;
  std::string error;  // non-empty: nothing was measured, and why
};
GpuRates measure_gpu_rates();
// Runs `host_work` on this thread while a thread of its own copies 1 GiB of pinned host memory to
// device 0 back to back (two 64 MiB copies in flight), and returns the copy rate over the time
// `host_work` took (GB/s). The weights' DMA and the CPU's reads share host DRAM; `ferry calibrate`
// measures both sides at once with it. With `pace_gbs` > 0 the copies are 8 MiB pieces issued at that
// average rate instead (bench_cpu_attention: how the CPU's reads fare beside a steady trickle rather
// than bursts). On error (no GPU), host_work is not run and the error is set.
struct SharedCopyRate {
  double h2d_gbs = 0;
  double host_seconds = 0;  // how long host_work took
  std::string error;
};
SharedCopyRate h2d_during(const std::function<void()>& host_work, double pace_gbs = 0);
// Returns true when ferry was built with the CUDA backend.
bool built_with_cuda();

}  // namespace ferry::gpu
