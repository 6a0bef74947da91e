// bench_gpu_attention: prefill attention over the paged GPU cache, the tensor-core tiles against the
// CUDA-core tiles, on real models' head shapes. Prints ms, TFLOP/s (causal: 4 head_dim flops per
// query row and visible key) and the fraction of the dense BF16 rate cuBLAS reaches on this GPU (a
// 8192^3 GEMM, measured here). Usage: bench_gpu_attention [block_size]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "gpu/kernels.h"

using namespace ferry::gpu;

int main(int argc, char** argv) {
  const int64_t bs = argc > 1 ? std::atoll(argv[1]) : 16;
  cublasHandle_t h;
  CUBLAS_CHECK(cublasCreate(&h));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  float ms = 0;
  // The dense rate: C = A B^T, 8192^3 BF16 (f32 out), as the executor's GEMMs run.
  double peak = 0;
  {
    const int64_t N = 8192;
    bf16 *a, *b;
    float* c;
    CUDA_CHECK(cudaMalloc(&a, N * N * 2));
    CUDA_CHECK(cudaMalloc(&b, N * N * 2));
    CUDA_CHECK(cudaMalloc(&c, N * N * 4));
    synthetic_fill(1, 0.02f, false, N * N, a, nullptr);
    synthetic_fill(2, 0.02f, false, N * N, b, nullptr);
    for (int i = 0; i < 3; ++i) gemm(h, a, b, c, N, N, N, true);
    CUDA_CHECK(cudaEventRecord(e0));
    for (int i = 0; i < 10; ++i) gemm(h, a, b, c, N, N, N, true);
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    peak = 2.0 * N * N * N * 10 / (ms * 1e9);
    std::printf("cuBLAS BF16 GEMM 8192^3: %.0f TFLOP/s\n\n", peak);
    CUDA_CHECK(cudaFree(a));
    CUDA_CHECK(cudaFree(b));
    CUDA_CHECK(cudaFree(c));
  }
  struct Case {
    const char* name;
    int64_t n_heads, n_kv, hd, n_seq, len;
  };
  const Case cases[] = {{"Llama-3-8B heads, 3 x 512 (a prompt step of the 8B b256 row)", 32, 8, 128, 3, 512},
                        {"Llama-3-8B heads, 1 x 4096", 32, 8, 128, 1, 4096},
                        {"Llama-2-7B heads, 4 x 512", 32, 32, 128, 4, 512},
                        {"Llama-3-70B heads, 1 x 2048", 64, 8, 128, 1, 2048},
                        {"Qwen2.5-7B heads (group 7), 2 x 1024", 28, 4, 128, 2, 1024}};
  std::printf("block size %lld\n\n| shape | kernel | ms | TFLOP/s | of GEMM rate |\n|---|---|---|---|---|\n", static_cast<long long>(bs));
  std::mt19937 rng(7);
  for (const Case& cs : cases) {
    const int64_t T = cs.n_seq * cs.len, blocks_per = (cs.len + bs - 1) / bs, n_blocks = cs.n_seq * blocks_per;
    const int64_t kv_elems = n_blocks * bs * cs.n_kv * cs.hd;
    bf16 *k, *v, *q, *out;
    CUDA_CHECK(cudaMalloc(&k, kv_elems * 2));
    CUDA_CHECK(cudaMalloc(&v, kv_elems * 2));
    CUDA_CHECK(cudaMalloc(&q, T * cs.n_heads * cs.hd * 2));
    CUDA_CHECK(cudaMalloc(&out, T * cs.n_heads * cs.hd * 2));
    synthetic_fill(3, 1.0f, false, kv_elems, k, nullptr);
    synthetic_fill(4, 1.0f, false, kv_elems, v, nullptr);
    synthetic_fill(5, 1.0f, false, T * cs.n_heads * cs.hd, q, nullptr);
    // Blocks in a shuffled order, as a pool that has served other sequences hands them out.
    std::vector<int32_t> ids(n_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::vector<int32_t> pos(T), row(T), seq(T);
    for (int64_t t = 0; t < T; ++t) {
      pos[t] = static_cast<int32_t>(t % cs.len);
      row[t] = seq[t] = static_cast<int32_t>(t / cs.len);
    }
    int32_t *dpos, *drow, *dtab, *dtiles;
    CUDA_CHECK(cudaMalloc(&dpos, T * 4));
    CUDA_CHECK(cudaMalloc(&drow, T * 4));
    CUDA_CHECK(cudaMalloc(&dtab, n_blocks * 4));
    CUDA_CHECK(cudaMalloc(&dtiles, 2 * T * 4));
    CUDA_CHECK(cudaMemcpy(dpos, pos.data(), T * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(drow, row.data(), T * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(dtab, ids.data(), n_blocks * 4, cudaMemcpyHostToDevice));
    PagedKv kv{k, v, dtab, static_cast<int32_t>(blocks_per), static_cast<int32_t>(bs), static_cast<int32_t>(cs.n_kv), static_cast<int32_t>(cs.hd)};
    double flops = 0;
    for (int64_t t = 0; t < T; ++t) flops += 4.0 * cs.hd * cs.n_heads * (pos[t] + 1);
    for (int mma = 1; mma >= 0; --mma) {
      std::vector<int32_t> tiles(2 * T);
      QueryTiles qt = build_query_tiles(seq.data(), T, cs.n_heads, cs.n_kv, cs.hd, mma != 0, tiles.data());
      CUDA_CHECK(cudaMemcpy(dtiles, tiles.data(), 2 * qt.n * 4, cudaMemcpyHostToDevice));
      qt.d = dtiles;
      auto run = [&] { attention(q, dpos, drow, qt, T, cs.n_heads, 0, kv, 1, nullptr, out, nullptr); };
      for (int i = 0; i < 3; ++i) run();
      const int reps = 20;
      CUDA_CHECK(cudaEventRecord(e0));
      for (int i = 0; i < reps; ++i) run();
      CUDA_CHECK(cudaEventRecord(e1));
      CUDA_CHECK(cudaEventSynchronize(e1));
      CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      const double t_ms = ms / reps, tf = flops / (t_ms * 1e9);
      std::printf("| %s | %s | %.3f | %.1f | %.1f%% |\n", cs.name, mma ? (qt.n_mma == qt.n ? "tensor cores" : "mixed") : "CUDA cores", t_ms, tf,
                  100.0 * tf / peak);
    }
    for (void* p : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q), static_cast<void*>(out), static_cast<void*>(dpos),
                    static_cast<void*>(drow), static_cast<void*>(dtab), static_cast<void*>(dtiles)})
      CUDA_CHECK(cudaFree(p));
  }
  return 0;
}
