#include "gpu/device.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>

#include "gpu/common.cuh"
#include "gpu/kernels.h"
#include "models/weight_format.h"

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
  char bus[32] = {0};
  if (cudaDeviceGetPCIBusId(bus, sizeof bus, 0) == cudaSuccess) info.pci_bus = bus;
  info.cc_minor = p.minor;
  return info;
}

GpuRates measure_gpu_rates() {
  GpuRates r;
  if (probe().n_devices == 0) {
    r.error = "no usable GPU";
    return r;
  }
  void* host = nullptr;
  void* a = nullptr;
  void* b = nullptr;
  cudaStream_t s = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  cublasHandle_t h = nullptr;
  try {
    const size_t n = size_t{1} << 30;
    CUDA_CHECK(cudaMallocHost(&host, n));
    std::fill_n(static_cast<char*>(host), n, 1);
    CUDA_CHECK(cudaMalloc(&a, n));
    CUDA_CHECK(cudaMalloc(&b, n));
    CUDA_CHECK(cudaStreamCreate(&s));
    CUDA_CHECK(cudaEventCreate(&e0));
    CUDA_CHECK(cudaEventCreate(&e1));
    auto best_ms = [&](auto&& fn) {
      float best = 1e30f;
      for (int i = 0; i < 4; ++i) {
        CUDA_CHECK(cudaEventRecord(e0, s));
        fn();
        CUDA_CHECK(cudaEventRecord(e1, s));
        CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (i > 0) best = std::min(best, ms);  // the first run warms up
      }
      return static_cast<double>(best);
    };
    r.h2d_gbs = n / (best_ms([&] { CUDA_CHECK(cudaMemcpyAsync(a, host, n, cudaMemcpyHostToDevice, s)); }) * 1e-3) / 1e9;
    r.d2h_gbs = n / (best_ms([&] { CUDA_CHECK(cudaMemcpyAsync(host, a, n, cudaMemcpyDeviceToHost, s)); }) * 1e-3) / 1e9;
    r.hbm_gbs = 2.0 * n / (best_ms([&] { CUDA_CHECK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s)); }) * 1e-3) / 1e9;
    CUBLAS_CHECK(cublasCreate(&h));
    CUBLAS_CHECK(cublasSetStream(h, s));
    const int64_t M = 8192, N = 8192, K = 8192;  // x [M, K] bf16 in a, w [N, K] in b, y f32 in host-sized space
    float* y = nullptr;
    CUDA_CHECK(cudaMalloc(&y, M * N * sizeof(float)));
    synthetic_fill(1, 0.05f, false, M * K, static_cast<bf16*>(a), s);  // random values: zeros would flatter the tensor cores
    synthetic_fill(2, 0.05f, false, N * K, static_cast<bf16*>(b), s);
    const double ms = best_ms([&] { gemm_f32(h, static_cast<bf16*>(a), static_cast<bf16*>(b), y, M, N, K, s); });
    r.gemm_tflops = 2.0 * M * N * K / (ms * 1e-3) / 1e12;
    // The decode GEMV (M = 1) with b as the weights (the GEMM's random bits: the time does not depend
    // on the values), as many K = 8192 rows of each format as 1 GiB holds; y has room for them. A
    // format that fails keeps 0 (not measured: the planner then uses the HBM rate).
    for (WeightFormat f : kWeightFormats) try {
      const int64_t Kg = 8192;
      const int64_t rows = std::min(static_cast<int64_t>(n) / weight_format_bytes(f, 1, Kg), M * N);  // a row's blob rounds up
      const DType t = weight_format_info(f).dtype;
      const double gms = best_ms([&] { gemv_store(GemvIn{static_cast<bf16*>(a)}, GemvW{b, t}, y, 1, rows, Kg, s); });
      (t == DType::kBF16 ? r.gemv_gbs : t == DType::kNF4 ? r.gemv_nf4_gbs : t == DType::kNF4DQ ? r.gemv_nf4dq_gbs : r.gemv_q8_gbs) =
          weight_format_bytes(f, rows, Kg) / (gms * 1e-3) / 1e9;
    } catch (const CudaError&) {
      cudaGetLastError();  // a launch error is not sticky: the other formats and rates stand
    }
    cudaFree(y);
  } catch (const CudaError& e) {
    r.error = e.what();
  }
  if (h) cublasDestroy(h);
  if (e0) cudaEventDestroy(e0);
  if (e1) cudaEventDestroy(e1);
  if (s) cudaStreamDestroy(s);
  cudaFree(a);
  cudaFree(b);
  if (host) cudaFreeHost(host);
  return r;
}

SharedCopyRate h2d_during(const std::function<void()>& host_work, double pace_gbs) {
  SharedCopyRate r;
  std::exception_ptr work_error;
  if (probe().n_devices == 0) {
    r.error = "no usable GPU";
    return r;
  }
  const size_t kPiece = pace_gbs > 0 ? size_t{8} << 20 : size_t{64} << 20, kPieces = (size_t{1} << 30) / kPiece;
  void* host = nullptr;
  void* dev = nullptr;
  cudaStream_t s = nullptr;
  cudaEvent_t done[2] = {nullptr, nullptr};
  try {
    CUDA_CHECK(cudaMallocHost(&host, kPiece * kPieces));
    std::fill_n(static_cast<char*>(host), kPiece * kPieces, 1);
    CUDA_CHECK(cudaMalloc(&dev, kPiece * kPieces));
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    for (auto& e : done) CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync));
    using Clock = std::chrono::steady_clock;
    std::atomic<bool> stop{false}, running{false};
    std::atomic<int64_t> bytes_in_window{0};
    std::atomic<bool> in_window{false};
    std::mutex error_mu;  // copier_error: written by the copier, read here before the join
    std::string copier_error;
    // The copier: piece i is issued once piece i - 2 is done, so two are always queued. Bytes
    // count toward the window when their copy completes inside it.
    std::thread copier([&] {
      try {
        CUDA_CHECK(cudaSetDevice(0));
        const auto start = Clock::now();
        for (size_t i = 0; !stop.load(std::memory_order_relaxed); ++i) {
          if (pace_gbs > 0)
            std::this_thread::sleep_until(start + std::chrono::duration_cast<Clock::duration>(
                                                      std::chrono::duration<double>(static_cast<double>(i * kPiece) / (pace_gbs * 1e9))));
          cudaEvent_t e = done[i % 2];
          if (i >= 2) {
            CUDA_CHECK(cudaEventSynchronize(e));
            if (in_window.load(std::memory_order_relaxed)) bytes_in_window.fetch_add(static_cast<int64_t>(kPiece));
            running.store(true);
          }
          const size_t off = (i % kPieces) * kPiece;
          CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dev) + off, static_cast<char*>(host) + off, kPiece, cudaMemcpyHostToDevice, s));
          CUDA_CHECK(cudaEventRecord(e, s));
        }
        CUDA_CHECK(cudaStreamSynchronize(s));
      } catch (const CudaError& e) {
        std::lock_guard<std::mutex> lock(error_mu);
        copier_error = e.what();
        running.store(true);
      }
    });
    while (!running.load()) std::this_thread::yield();
    bool failed = false;
    {
      std::lock_guard<std::mutex> lock(error_mu);
      failed = !copier_error.empty();
    }
    in_window.store(true);
    const auto t0 = Clock::now();
    try {
      if (!failed) host_work();
    } catch (...) {
      work_error = std::current_exception();  // rethrown once the copier stopped and all is freed
    }
    const auto t1 = Clock::now();
    in_window.store(false);
    stop.store(true);
    copier.join();
    if (!copier_error.empty()) throw CudaError(copier_error);
    r.host_seconds = std::chrono::duration<double>(t1 - t0).count();
    if (r.host_seconds > 0) r.h2d_gbs = static_cast<double>(bytes_in_window.load()) / r.host_seconds / 1e9;
    else r.error = "the host work took no measurable time";
  } catch (const CudaError& e) {
    r.error = e.what();
  }
  for (auto& e : done)
    if (e) cudaEventDestroy(e);
  if (s) cudaStreamDestroy(s);
  cudaFree(dev);
  if (host) cudaFreeHost(host);
  if (work_error) std::rethrow_exception(work_error);
  return r;
}

}  // namespace ferry::gpu
