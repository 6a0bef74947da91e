// bench_cpu_gemm: times the CPU matrix product y = x W^T for weights of Llama shapes and prints the
// achieved weight bandwidth and FLOP rate.
//
//   bench_cpu_gemm [--weights bf16|nf4|nf4-dq|int8] [M ...]
//                                               every path at every row count (CPU-computed layers
//                                               use the one marked)
//   bench_cpu_gemm --sgemm                      oneDNN's float32 sgemm on the training pass's shapes
//                                               (cpu/lora_train.h: [tokens, 4096] x [4096, 4096]^T and
//                                               x [4096, 11008] at 256 and 1024 tokens): the FLOP
//                                               rate `ferry finetune`'s floor is priced at
//   bench_cpu_gemm --layer [--weights bf16|nf4|nf4-dq|int8] [--hot] [--beside-copies] [--threads N] [--touch]
//                                               a CPU-computed layer's decode products (M = 1) over
//                                               weights larger than the caches: the rate ferry's
//                                               CPU layers read their weights at. --hot: the same
//                                               product on one thread (--threads N: N threads, N
//                                               times the rows) over weights that stay in L2
//                                               (the kernel's compute ceiling per core); --beside-copies: while the copy
//                                               engine pulls pinned memory to the GPU, as streamed
//                                               layers do (needs a GPU); --threads: at most N
//                                               threads (how the rate scales says whether
//                                               the cores or the memory bound it). The QKV at
//                                               float32 inputs, the rest at BF16 inputs, as
//                                               ferry's CPU layers beside a GPU run them.
//                                               --touch: the same rows and tasks read without
//                                               computing (what the access pattern alone reaches).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <optional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <tbb/blocked_range.h>
#include <tbb/global_control.h>
#include <tbb/parallel_for.h>

#include "cpu/gemm.h"
#include "cpu/simd.h"
#include "gpu/device.h"
#include "models/synthetic.h"
#include "models/weight_format.h"
#include "runtime/host_buffer.h"

using namespace ferry;

namespace {

template <typename F>
double median_ms(int reps, F&& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// One matrix of the given format filled with synthetic BF16 values (quantised from them).
HostBuffer make_weights(DType t, int64_t N, int64_t K, const std::string& name) {
  HostBuffer bf(static_cast<size_t>(N * K) * 2);
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, N * K, 1 << 20), [&](const auto& r) {
    synthetic_fill_bf16(name, K, false, r.begin(), r.end() - r.begin(), bf.as<uint16_t>() + r.begin());
  });
  if (t == DType::kBF16) return bf;
  HostBuffer q(static_cast<size_t>(quant_layout(t, N, K).bytes));
  quantize_bf16_weight(t, bf.as<uint16_t>(), N, K, q.as<uint8_t>());
  return q;
}

// --touch: the decode kernel's rows and tasks (about 32 KiB of weights a task), each row's bytes
// (codes, then its scales) read with 64-byte loads and nothing computed: what the access pattern
// alone reaches.
// XOR of rows [n0, n1)'s bytes and their scale bytes (sb a row at `scales`), 64 bytes a load (8
// without AVX-512).
int64_t touch_task_portable(const uint8_t* base, int64_t row_bytes, const uint8_t* scales, int64_t sb, int64_t n0, int64_t n1) {
  uint64_t acc = 0;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t o = 0; o < row_bytes; o += 8) acc ^= *reinterpret_cast<const uint64_t*>(base + n * row_bytes + o);
    for (int64_t o = 0; o < sb; o += 8) acc ^= *reinterpret_cast<const uint64_t*>(scales + n * sb + o);
  }
  return static_cast<int64_t>(acc);
}
#if defined(__x86_64__)
__attribute__((target("avx512f"))) int64_t touch_task(const uint8_t* base, int64_t row_bytes, const uint8_t* scales, int64_t sb, int64_t n0, int64_t n1) {
  __m512i acc = _mm512_setzero_si512();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = base + n * row_bytes;
    for (int64_t o = 0; o < row_bytes; o += 64) acc = _mm512_xor_si512(acc, _mm512_loadu_si512(row + o));
    for (int64_t o = 0; o < sb; o += 64) acc = _mm512_xor_si512(acc, _mm512_loadu_si512(scales + n * sb + o));
  }
  return _mm512_reduce_add_epi64(acc);
}
#endif
void touch_rows(const TensorView& W) {
  const int64_t N = W.shape[0], K = W.shape[1];
  const uint8_t* base = static_cast<const uint8_t*>(W.data);
  const int64_t row_bytes = is_nf4(W.dtype) ? K / 2 : W.dtype == DType::kQ8 ? K : 2 * K;
  const int64_t sb = W.dtype == DType::kNF4 ? K / 64 * 4 : W.dtype == DType::kNF4DQ ? K / 64 : 0;  // a row's scale bytes
  const uint8_t* scales = sb > 0 ? base + quant_layout(W.dtype, N, K).scales : nullptr;
  const int64_t grain = std::max<int64_t>(1, 32768 / row_bytes);
  static std::atomic<int64_t> sink{0};
#if defined(__x86_64__)
  const bool avx512 = __builtin_cpu_supports("avx512f");
#endif
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, N, grain), [&](const tbb::blocked_range<int64_t>& r) {
#if defined(__x86_64__)
    if (avx512) {
      sink.fetch_xor(touch_task(base, row_bytes, scales, sb, r.begin(), r.end()), std::memory_order_relaxed);
      return;
    }
#endif
    sink.fetch_xor(touch_task_portable(base, row_bytes, scales, sb, r.begin(), r.end()), std::memory_order_relaxed);
  });
}

bool g_touch = false;

int layer_bench(DType t, bool hot, bool beside, int threads) {
  // Llama-3-70B's decode products (qkv, o, gate+up, down), or in --hot mode one matrix of 256 rows
  // of 4096 (0.5 MiB of NF4, at most 2 MiB) a thread: on one thread it stays in L2 (the kernel's
  // compute ceiling per core); on more, the rows move between the cores' tasks (cache-resident).
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const std::vector<Shape> shapes = hot ? std::vector<Shape>{{"hot", 256 * std::max(threads, 1), 4096}}
                                        : std::vector<Shape>{{"qkv", 10240, 8192}, {"o", 8192, 8192}, {"gate_up", 57344, 8192}, {"down", 8192, 28672}};
  std::vector<HostBuffer> w;
  std::vector<TensorView> views;
  int64_t bytes = 0, params = 0;
  for (const auto& s : shapes) {
    const int64_t n = s.n;
    w.push_back(make_weights(t, n, s.k, s.name));
    views.push_back(TensorView::contiguous(w.back().data(), t, {n, s.k}));
    const int64_t dims[2] = {n, s.k};
    bytes += tensor_bytes(t, dims, 2);
    params += n * s.k;
  }
  std::vector<float> x(28672), y(57344);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
  const int reps = hot ? 1000 : 1;
  std::optional<tbb::global_control> limit;
  if (hot || threads > 0) limit.emplace(tbb::global_control::max_allowed_parallelism, std::max(threads, 1));
  auto run = [&] {
    for (int r = 0; r < reps; ++r)
      for (size_t i = 0; i < views.size(); ++i)
        if (g_touch) touch_rows(views[i]);
        else cpu::gemm_xwt(x.data(), 1, views[i], y.data(), {}, std::string(shapes[i].name) == "qkv" ? cpu::GemmPrecision::kExact : cpu::GemmPrecision::kBf16Inputs);
  };
  const double ms = median_ms(hot ? 5 : 9, run) / reps;
  std::printf("| %s | %s%s | %s | %.3f | %.1f | %.1f |", std::string(dtype_name(t)).c_str(), hot ? "hot (L2)" : "cold",
              threads > 0 ? (", " + std::to_string(threads) + (threads == 1 ? " thread" : " threads")).c_str() : "", beside ? "copies beside" : "alone", ms,
              static_cast<double>(bytes) / (ms * 1e6), 2.0 * static_cast<double>(params) / (ms * 1e6));
  if (beside) {
    const gpu::SharedCopyRate r = gpu::h2d_during([&] {
      for (int i = 0; i < 8; ++i) run();
    });
    if (!r.error.empty()) {
      std::printf(" (no copies: %s)\n", r.error.c_str());
      return 1;
    }
    const double ms_b = r.host_seconds * 1e3 / (8 * reps);
    std::printf(" beside: %.3f ms, %.1f GB/s, H2D %.1f GB/s |", ms_b, static_cast<double>(bytes) / (ms_b * 1e6), r.h2d_gbs);
  }
  std::printf("\n");
  return 0;
}

int row_count_bench(const std::vector<int64_t>& ms, DType t) {
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const Shape shapes[] = {{"qkv-ish 4096x4096", 4096, 4096}, {"ffn up 11008x4096", 11008, 4096}, {"ffn down 4096x11008", 4096, 11008}};
  std::printf("| shape | M | path | ms | weight GB/s | GFLOP/s |\n|---|---|---|---|---|---|\n");
  for (const auto& s : shapes) {
    HostBuffer w = make_weights(t, s.n, s.k, s.name);
    TensorView W = TensorView::contiguous(w.data(), t, {s.n, s.k});
    for (int64_t m : ms) {
      std::vector<float> x(m * s.k, 0.01f), y(m * s.n);
      for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
      // stream: the decode kernel (up to 3 rows); onednn: float32 panels through oneDNN (the exact
      // path); bf16: what CPU-computed layers take at more rows (gemm_xwt at BF16 inputs: oneDNN's
      // BF16 matmul over W, or over BF16 panels of quantised W).
      for (int path = 0; path < 3; ++path) {
        if (path == 0 && m > cpu::kGemvMaxRows && t != DType::kBF16) continue;
        if (path == 2 && m <= cpu::kGemvMaxRows) continue;
        const double ms_med = median_ms(5, [&] {
          if (path == 0) cpu::gemm_xwt_stream(x.data(), m, W, y.data());
          else if (path == 1) cpu::gemm_xwt_onednn(x.data(), m, W, y.data());
          else cpu::gemm_xwt(x.data(), m, W, y.data(), {}, cpu::GemmPrecision::kBf16Inputs);
        });
        const int64_t dims[2] = {s.n, s.k};
        const double gbs = static_cast<double>(tensor_bytes(t, dims, 2)) / (ms_med * 1e6);
        const double gflops = 2.0 * m * s.n * s.k / (ms_med * 1e6);
        const bool used = m <= cpu::kGemvMaxRows ? path == 0 : path == 2;
        std::printf("| %s | %lld | %s%s | %.3f | %.1f | %.1f |\n", s.name, static_cast<long long>(m), path == 0 ? "stream" : path == 1 ? "onednn" : "bf16",
                    used ? " (used)" : "", ms_med, gbs, gflops);
      }
    }
  }
  return 0;
}

}  // namespace

// The training pass's products: y = x W^T (forward) and dx = dy W (backward), float32, best of 5.
int sgemm_bench() {
  std::printf("| M x N x K | op | ms | GFLOP/s |\n|---|---|---|---|\n");
  for (const int64_t M : {int64_t{256}, int64_t{1024}})
    for (const auto& [N, K] : {std::pair<int64_t, int64_t>{4096, 4096}, {11008, 4096}, {4096, 11008}})
      for (const bool back : {false, true}) {
        std::vector<float> a(static_cast<size_t>(M * (back ? N : K)), 0.01f), w(static_cast<size_t>(N * K), 0.02f),
            c(static_cast<size_t>(M * (back ? K : N)));
        auto run = [&] {
          if (back) cpu::sgemm(false, false, M, K, N, 1.0f, a.data(), N, w.data(), K, 0.0f, c.data(), K);
          else cpu::sgemm(false, true, M, N, K, 1.0f, a.data(), K, w.data(), K, 0.0f, c.data(), N);
        };
        run();
        double best = 1e30;
        for (int r = 0; r < 5; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          run();
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        std::printf("| %lld x %lld x %lld | %s | %.1f | %.1f |\n", static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K),
                    back ? "dy W" : "x W^T", best * 1e3, 2.0 * M * N * K / best / 1e9);
      }
  return 0;
}

int main(int argc, char** argv) {
  std::vector<int64_t> ms;
  bool layer = false, hot = false, beside = false;
  int threads = 0;
  DType t = DType::kBF16;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--sgemm") return sgemm_bench();
    if (a == "--layer") layer = true;
    else if (a == "--hot") hot = true;
    else if (a == "--beside-copies") beside = true;
    else if (a == "--touch") g_touch = true;
    else if (a == "--threads" && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
      if (threads < 1) {
        std::fprintf(stderr, "bench_cpu_gemm: --threads %s: expected a positive count\n", argv[i]);
        return 2;
      }
    }
    else if (a == "--weights" && i + 1 < argc) {
      const std::string v = argv[++i];
      if (v == "bf16") t = DType::kBF16;
      else if (v == "nf4") t = DType::kNF4;
      else if (v == "nf4-dq") t = DType::kNF4DQ;
      else if (v == "int8") t = DType::kQ8;
      else {
        std::fprintf(stderr, "bench_cpu_gemm: --weights %s: expected bf16, nf4, nf4-dq or int8\n", v.c_str());
        return 2;
      }
    } else if (!a.empty() && a[0] != '-') ms.push_back(std::atoll(a.c_str()));
    else {
      std::fprintf(stderr, "bench_cpu_gemm: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  std::printf("simd: %s\n", cpu::simd_level());
  if (layer) {
    std::printf("| weights | data | copies | ms per layer | weight GB/s | GFLOP/s |\n|---|---|---|---|---|---|\n");
    return layer_bench(t, hot, beside, threads);
  }
  if (ms.empty()) ms = {1, 2, 4, 8, 16, 64};
  return row_count_bench(ms, t);
}
