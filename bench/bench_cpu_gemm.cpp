// bench_cpu_gemm: times the CPU matrix product y = x W^T for BF16 weights of Llama shapes, both
// paths at every row count (gemm_xwt uses the one marked), and prints achieved weight
// bandwidth and FLOP rate next to the machine's floor. Usage: bench_cpu_gemm [M ...]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/simd.h"
#include "models/synthetic.h"
#include "runtime/host_buffer.h"

using namespace ferry;

int main(int argc, char** argv) {
  std::vector<int64_t> ms = {1, 2, 4, 8, 16, 64};
  if (argc > 1) {
    ms.clear();
    for (int i = 1; i < argc; ++i) ms.push_back(std::atoll(argv[i]));
  }
  struct Shape {
    const char* name;
    int64_t n, k;
  };
  const Shape shapes[] = {{"qkv-ish 4096x4096", 4096, 4096}, {"ffn up 11008x4096", 11008, 4096}, {"ffn down 4096x11008", 4096, 11008}};
  std::printf("simd: %s\n", cpu::simd_level());
  std::printf("| shape | M | path | ms | weight GB/s | GFLOP/s |\n|---|---|---|---|---|---|\n");
  for (const auto& s : shapes) {
    HostBuffer w(static_cast<size_t>(s.n * s.k) * 2);
    synthetic_fill_bf16(s.name, s.k, false, 0, s.n * s.k, w.as<uint16_t>());
    TensorView W = TensorView::contiguous(w.data(), DType::kBF16, {s.n, s.k});
    for (int64_t m : ms) {
      std::vector<float> x(m * s.k, 0.01f), y(m * s.n);
      for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
      for (int onednn = 0; onednn < 2; ++onednn) {
        auto run = [&] {
          if (onednn) cpu::gemm_xwt_onednn(x.data(), m, W, y.data());
          else cpu::gemm_xwt_stream(x.data(), m, W, y.data());
        };
        run();  // warm-up
        std::vector<double> t;
        for (int r = 0; r < 5; ++r) {
          auto t0 = std::chrono::steady_clock::now();
          run();
          t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        }
        std::sort(t.begin(), t.end());
        const double ms_med = t[t.size() / 2];
        const double gbs = static_cast<double>(w.size()) / (ms_med * 1e6);
        const double gflops = 2.0 * m * s.n * s.k / (ms_med * 1e6);
        std::printf("| %s | %lld | %s%s | %.3f | %.1f | %.1f |\n", s.name, static_cast<long long>(m), onednn ? "onednn" : "stream",
                    (m <= cpu::kGemvMaxRows) == !onednn ? " (used)" : "", ms_med, gbs, gflops);
      }
    }
  }
  return 0;
}
