// bench_gpu_gemv [7b|70b]: weight bandwidth of the decode GEMMs (y = x W^T) on Llama-2-7B's (default) or Llama-3-70B's shapes,
// ferry's streaming GEMV against cuBLAS, for M = 1..16 rows. Prints GB/s of weight bytes read and the
// fraction of a measured device-to-device copy rate (bytes read + written per second: the HBM rate).
#include <cstdio>
#include <string>
#include <vector>

#include "gpu/kernels.h"
#include "models/weight_format.h"

using namespace ferry;
using namespace ferry::gpu;

int main(int argc, char** argv) {
  const bool big = argc > 1 && std::string(argv[1]) == "70b";
  cublasHandle_t h;
  CUBLAS_CHECK(cublasCreate(&h));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  // The floor: a 2 GiB device-to-device copy.
  const size_t cb = size_t{2} << 30;
  void *a, *b;
  CUDA_CHECK(cudaMalloc(&a, cb));
  CUDA_CHECK(cudaMalloc(&b, cb));
  CUDA_CHECK(cudaMemset(a, 1, cb));
  for (int i = 0; i < 3; ++i) CUDA_CHECK(cudaMemcpy(b, a, cb, cudaMemcpyDeviceToDevice));
  CUDA_CHECK(cudaEventRecord(e0));
  for (int i = 0; i < 10; ++i) CUDA_CHECK(cudaMemcpyAsync(b, a, cb, cudaMemcpyDeviceToDevice));
  CUDA_CHECK(cudaEventRecord(e1));
  CUDA_CHECK(cudaEventSynchronize(e1));
  float ms;
  CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
  const double floor_gbs = 2.0 * cb * 10 / (ms * 1e6);
  std::printf("device-to-device copy: %.0f GB/s (read + write)\n", floor_gbs);
  CUDA_CHECK(cudaFree(a));
  CUDA_CHECK(cudaFree(b));

  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const std::vector<Shape> shapes =
      big ? std::vector<Shape>{{"qkv 10240x8192", 10240, 8192}, {"o 8192x8192", 8192, 8192}, {"gate_up 57344x8192", 57344, 8192},
                               {"down 8192x28672", 8192, 28672}, {"lm_head 128256x8192", 128256, 8192}}
          : std::vector<Shape>{{"qkv 12288x4096", 12288, 4096}, {"o 4096x4096", 4096, 4096}, {"gate_up 22016x4096", 22016, 4096},
                               {"down 4096x11008", 4096, 11008}, {"lm_head 32000x4096", 32000, 4096}};
  // Several weight copies rotated so that L2 (50 MB) never holds the one being read.
  const int n_copies = 4;
  // Microseconds per call of run(i) (i picks the weight copy): 8 warm-up calls, then 40 timed.
  auto time_us = [&](const auto& run) {
    for (int i = 0; i < 8; ++i) run(i);
    const int reps = 40;
    CUDA_CHECK(cudaEventRecord(e0));
    for (int i = 0; i < reps; ++i) run(i);
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    return t * 1e3 / reps;
  };
  std::printf("| shape | M | kernel | us | GB/s | of floor |\n|---|---|---|---|---|---|\n");
  for (const auto& s : shapes) {
    std::vector<bf16*> ws(n_copies);
    for (auto& w : ws) {
      CUDA_CHECK(cudaMalloc(&w, s.n * s.k * 2));
      synthetic_fill(1234, 0.02f, false, s.n * s.k, w, nullptr);
    }
    bf16* x;
    float* y;
    CUDA_CHECK(cudaMalloc(&x, 16 * s.k * 2));
    CUDA_CHECK(cudaMalloc(&y, 16 * s.n * 4));
    synthetic_fill(99, 1.0f, false, 16 * s.k, x, nullptr);
    for (int64_t M : {1, 2, 4, 8, 16}) {
      for (int use_blas = 0; use_blas < 2; ++use_blas) {
        if (!use_blas && M > kGemvMaxRows) continue;
        auto run = [&](int i) {
          if (use_blas) gemm(h, x, ws[i % n_copies], y, M, s.n, s.k, true);
          else gemv(x, ws[i % n_copies], y, M, s.n, s.k, nullptr);
        };
        const double us = time_us(run);
        const double gbs = static_cast<double>(s.n * s.k * 2) / (us * 1e3);
        std::printf("| %s | %lld | %s | %.1f | %.0f | %.0f%% |\n", s.name, static_cast<long long>(M), use_blas ? "cublas" : "gemv", us, gbs,
                    100.0 * gbs / floor_gbs);
      }
    }
    // Quantised copies (NF4, NF4-DQ, Q8: quantised on the GPU from the BF16 ones), M = 1 and 2: GB/s
    // of the quantised bytes (FERRY_GPU_QROWS sets the rows a warp streams at M = 1).
    for (DType t : {DType::kNF4, DType::kNF4DQ, DType::kQ8}) {
      const int64_t qb = quant_layout(t, s.n, s.k).bytes;
      std::vector<uint8_t*> qs(n_copies);
      float* stage = nullptr;
      if (const int64_t sf = quant_stage_floats(t, s.n, s.k)) CUDA_CHECK(cudaMalloc(&stage, sf * sizeof(float)));
      for (int c = 0; c < n_copies; ++c) {
        CUDA_CHECK(cudaMalloc(&qs[c], qb));
        quantize_rows(t, ws[c], s.n, s.k, 0, s.n, qs[c], nullptr, stage);
        finish_quant(t, s.n, s.k, stage, qs[c], nullptr);
      }
      if (stage) CUDA_CHECK(cudaFree(stage));
      for (int64_t M : {1, 2})
        for (int precise = 0; precise < (is_nf4(t) ? 2 : 1); ++precise) {  // NF4: BF16 code values, and hi + lo (the QKV's)
          auto run = [&](int i) { gemv_store(GemvIn{x}, GemvW{qs[i % n_copies], t, precise != 0}, y, M, s.n, s.k, nullptr); };
          const double us = time_us(run);
          const double gbs = static_cast<double>(qb) / (us * 1e3);
          std::printf("| %s | %lld | gemv %s%s | %.1f | %.0f | %.0f%% |\n", s.name, static_cast<long long>(M), std::string(dtype_name(t)).c_str(),
                      precise ? " precise" : "", us, gbs, 100.0 * gbs / floor_gbs);
        }
      for (auto q : qs) CUDA_CHECK(cudaFree(q));
    }
    for (auto w : ws) CUDA_CHECK(cudaFree(w));
    CUDA_CHECK(cudaFree(x));
    CUDA_CHECK(cudaFree(y));
  }
  return 0;
}
