// GPU suites (ctest label `gpu`): every GPU op against the CPU op and a scalar reference on fresh
// random inputs at several shapes, and the golden checks on the GPU backend at BF16 tolerance. The
// binary exits 77 (ctest: skipped) where no GPU answers.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>
#include <httplib.h>
#include <nlohmann/json.hpp>
#include <thread>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <fstream>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/cpu_executor.h"
#include "cpu/ops.h"
#include "gpu/device.h"
#include "gpu/gpu_executor.h"
#include "gpu/kernels.h"
#include "models/synthetic.h"
#include "models/weight_format.h"
#include "offload/packed_store.h"
#include "runtime/generate.h"
#include "runtime/server.h"
#include "runtime/model.h"
#include "runtime/trace.h"
#include "test_util.h"

using namespace ferry;
using gpu::bf16;

namespace {

std::mt19937_64 g_rng(4242);

std::vector<float> randn(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g_rng);
  return v;
}
// y[M, N] = x[M, K] w[N, K]^T in double, rounded to float.
std::vector<float> ref_matmul(const std::vector<float>& x, const std::vector<float>& w, int64_t M, int64_t N, int64_t K) {
  std::vector<float> y(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(x[i * K + k]) * w[j * K + k];
      y[i * N + j] = static_cast<float>(acc);
    }
  return y;
}
// Rounds to bf16 in place and returns the bf16 bits.
std::vector<uint16_t> to_bf16_bits(std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    b[i] = f32_to_bf16(v[i]);
    v[i] = bf16_to_f32(b[i]);
  }
  return b;
}

// A device buffer holding a copy of host data.
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) { CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) { CUDA_CHECK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice)); }
  ~Dev() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

std::vector<float> bits_to_f32(const std::vector<uint16_t>& b) {
  std::vector<float> f(b.size());
  for (size_t i = 0; i < b.size(); ++i) f[i] = bf16_to_f32(b[i]);
  return f;
}

double rel(const std::vector<float>& a, const std::vector<float>& ref) {
  REQUIRE(a.size() == ref.size());
  double d = 0, m = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    REQUIRE_MESSAGE(std::isfinite(a[i]), "non-finite output at " << i);
    d = std::max(d, static_cast<double>(std::fabs(a[i] - ref[i])));
    m = std::max(m, static_cast<double>(std::fabs(ref[i])));
  }
  return d / m;
}

}  // namespace

int main(int argc, char** argv) {
  const gpu::GpuInfo info = gpu::probe();
  if (info.n_devices == 0) {
    std::printf("no GPU (%s): GPU tests skipped\n", info.why_none.c_str());
    return 77;
  }
  std::printf("GPU: %s, %.1f GiB, sm_%d%d\n", info.name.c_str(), info.total_bytes / 1073741824.0, info.cc_major, info.cc_minor);
  doctest::Context ctx(argc, argv);
  return ctx.run();
}

TEST_SUITE("gpu_ops") {
  TEST_CASE("gemm: BF16 x BF16 -> BF16 / F32 against a double reference, several shapes") {
    cublasHandle_t h;
    CUBLAS_CHECK(cublasCreate(&h));
    for (auto [M, N, K] : std::vector<std::array<int64_t, 3>>{{1, 4096, 4096}, {3, 100, 64}, {17, 768, 288}, {128, 512, 1024}}) {
      std::vector<float> x = randn(M * K), w = randn(N * K, 0.05f);
      auto xb = to_bf16_bits(x), wb = to_bf16_bits(w);
      const std::vector<float> ref = ref_matmul(x, w, M, N, K);
      Dev<uint16_t> dx(xb), dw(wb);
      Dev<float> y32(M * N);
      Dev<uint16_t> y16(M * N);
      gpu::gemm(h, reinterpret_cast<bf16*>(dx.p), reinterpret_cast<bf16*>(dw.p), y32.p, M, N, K, true);
      gpu::gemm(h, reinterpret_cast<bf16*>(dx.p), reinterpret_cast<bf16*>(dw.p), y16.p, M, N, K, false);
      CAPTURE(M);
      CAPTURE(N);
      CAPTURE(K);
      CHECK(rel(y32.get(), ref) < 1e-5);
      CHECK(rel(bits_to_f32(y16.get()), ref) < 1e-2);
      if (M <= gpu::kGemvMaxRows && K % 8 == 0) {
        Dev<float> yv(M * N);
        gpu::gemv(reinterpret_cast<bf16*>(dx.p), reinterpret_cast<bf16*>(dw.p), yv.p, M, N, K, nullptr);
        CHECK(rel(yv.get(), ref) < 1e-5);
      }
    }
    // The streaming GEMV at every row count and ragged shapes (K not a multiple of its unrolled stride).
    for (int64_t M = 1; M <= gpu::kGemvMaxRows; ++M) {
      for (auto [N, K] : std::vector<std::array<int64_t, 2>>{{7, 8}, {33, 1032}, {1000, 4096}, {129, 11008}}) {
        std::vector<float> x = randn(M * K), w = randn(N * K, 0.05f);
        auto xb = to_bf16_bits(x), wb = to_bf16_bits(w);
        const std::vector<float> ref = ref_matmul(x, w, M, N, K);
        Dev<uint16_t> dx(xb), dw(wb);
        Dev<float> y(M * N), y2(M * N);
        gpu::gemv(reinterpret_cast<bf16*>(dx.p), reinterpret_cast<bf16*>(dw.p), y.p, M, N, K, nullptr);
        gpu::gemm_f32(h, reinterpret_cast<bf16*>(dx.p), reinterpret_cast<bf16*>(dw.p), y2.p, M, N, K, nullptr);
        CAPTURE(M);
        CAPTURE(N);
        CAPTURE(K);
        CHECK(rel(y.get(), ref) < 1e-5);
        CHECK(rel(y2.get(), ref) < 1e-5);
      }
    }
    // hi + lo rows (the QKV GEMV at decode): x kept to ~16 mantissa bits, T rows of products; the
    // weights-fixed (programmatic) launch after another kernel gives the same.
    for (int64_t M : {1, 2, 3}) {
      const int64_t N = 1000, K = 4104;
      std::vector<float> x = randn(M * K), w = randn(N * K, 0.05f), x_exact = x;
      auto wb = to_bf16_bits(w);
      std::vector<float> hi = x;
      auto hib = to_bf16_bits(hi);
      std::vector<float> lo(M * K);
      for (int64_t i = 0; i < M * K; ++i) lo[i] = x_exact[i] - hi[i];
      auto lob = to_bf16_bits(lo);
      const std::vector<float> ref = ref_matmul(x_exact, w, M, N, K);
      Dev<uint16_t> dhi(hib), dlo(lob), dw(wb);
      Dev<float> y(M * N), y_hi(M * N), y_pdl(M * N);
      gpu::gemv(reinterpret_cast<bf16*>(dhi.p), reinterpret_cast<bf16*>(dw.p), y.p, M, N, K, nullptr, false, reinterpret_cast<bf16*>(dlo.p));
      gpu::gemv(reinterpret_cast<bf16*>(dhi.p), reinterpret_cast<bf16*>(dw.p), y_hi.p, M, N, K, nullptr);
      gpu::swiglu(y_hi.p, 1, 8, reinterpret_cast<bf16*>(dlo.p) + M * K - 8, nullptr);  // a kernel before: it only writes a scratch tail
      gpu::gemv(reinterpret_cast<bf16*>(dhi.p), reinterpret_cast<bf16*>(dw.p), y_pdl.p, M, N, K, nullptr, true);
      CAPTURE(M);
      CHECK(rel(y.get(), ref) < 2e-5);
      CHECK(rel(y_hi.get(), ref) > 1e-4);  // hi alone is BF16's 8 bits: the lo part is what brought it down
      CHECK(y_pdl.get() == y_hi.get());
    }
    cublasDestroy(h);
  }

  TEST_CASE("fused decode GEMVs: residual + sums of squares, SwiGLU, RoPE + K/V append, input normalised on the fly") {
    auto B = [](Dev<uint16_t>& d) { return reinterpret_cast<bf16*>(d.p); };
    const int64_t K = 4104;  // not a multiple of the unrolled stride: the tail loop runs
    for (int64_t M = 1; M <= gpu::kGemvFusedMaxRows; ++M) {
      CAPTURE(M);
      // Residual: res += x W^T bit for bit as gemv() + add, and the parts sum to each row's squares.
      {
        const int64_t N = 1003;  // the last group of rows is partial
        std::vector<float> x = randn(M * K), w = randn(N * K, 0.05f), res0 = randn(M * N);
        auto xb = to_bf16_bits(x), wb = to_bf16_bits(w);
        Dev<uint16_t> dx(xb), dw(wb);
        Dev<float> y(M * N), res(res0), ss(M * gpu::gemv_ss_parts(N));
        gpu::gemv(B(dx), B(dw), y.p, M, N, K, nullptr);
        gpu::gemv_residual(gpu::GemvIn{B(dx)}, B(dw), res.p, ss.p, M, N, K, nullptr, true);
        const std::vector<float> yh = y.get(), rh = res.get(), sh = ss.get();
        bool same = true;
        for (int64_t i = 0; i < M * N; ++i) same = same && rh[i] == res0[i] + yh[i];
        CHECK(same);
        for (int64_t m = 0; m < M; ++m) {
          double want = 0, got = 0;
          for (int64_t n = 0; n < N; ++n) want += static_cast<double>(rh[m * N + n]) * rh[m * N + n];
          for (int64_t j = 0; j < gpu::gemv_ss_parts(N); ++j) got += sh[m * gpu::gemv_ss_parts(N) + j];
          CHECK(std::fabs(got - want) <= 1e-5 * want);
        }
      }
      // The normalised input: res [M, K], RMSNorm weight g, sums of squares in three uneven parts.
      std::vector<float> res = randn(M * K, 2.0f), g = randn(K, 0.3f);
      for (auto& v : g) v += 1.0f;
      auto gb = to_bf16_bits(g);
      const float eps = 1e-5f;
      std::vector<float> ssh(M * 3, 0.0f), xn(M * K);
      for (int64_t m = 0; m < M; ++m) {
        double t = 0;
        for (int64_t k = 0; k < K; ++k) {
          ssh[m * 3 + (k < 100 ? 0 : k < 3000 ? 1 : 2)] += res[m * K + k] * res[m * K + k];
          t += static_cast<double>(res[m * K + k]) * res[m * K + k];
        }
        const double inv = 1.0 / std::sqrt(t / K + eps);
        for (int64_t k = 0; k < K; ++k) xn[m * K + k] = static_cast<float>(res[m * K + k] * inv * g[k]);
      }
      Dev<float> dres(res), dss(ssh);
      Dev<uint16_t> dg(gb);
      const gpu::GemvIn norm{nullptr, nullptr, dres.p, B(dg), dss.p, 3, eps};
      // SwiGLU: gate rows then up rows.
      {
        const int64_t F = 515;
        std::vector<float> w = randn(2 * F * K, 0.05f), x = randn(M * K);
        auto wb = to_bf16_bits(w), xb = to_bf16_bits(x);
        Dev<uint16_t> dw(wb), dx(xb), h(M * F), h_ref(M * F), h_norm(M * F);
        Dev<float> gu(M * 2 * F);
        gpu::gemv(B(dx), B(dw), gu.p, M, 2 * F, K, nullptr);
        gpu::swiglu(gu.p, M, F, B(h_ref), nullptr);
        gpu::gemv_swiglu(gpu::GemvIn{B(dx)}, B(dw), B(h), M, F, K, nullptr);
        CHECK(h.get() == h_ref.get());  // the same products and the same activation
        gpu::gemv_swiglu(norm, B(dw), B(h_norm), M, F, K, nullptr, true);
        const std::vector<float> p = ref_matmul(xn, w, M, 2 * F, K);
        std::vector<float> want(M * F);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t i = 0; i < F; ++i) {
            const double a = p[m * 2 * F + i], b = p[m * 2 * F + F + i];
            want[m * F + i] = static_cast<float>(a / (1.0 + std::exp(-a)) * b);
          }
        CHECK(rel(bits_to_f32(h_norm.get()), want) < 1e-2);
      }
      // RoPE + K/V append (with a bias), against gemv() + rope_kv_append() and the normalised input.
      {
        const int64_t H = 6, n_kv = 2, hd = 64, bs = 16, W = (H + 2 * n_kv) * hd, max_blocks = 4;
        ModelConfig c;
        c.head_dim = hd;
        c.rope_theta = 10000;
        const std::vector<float> inv = rope_inv_freq(c);
        std::vector<float> w = randn(W * K, 0.05f), bias = randn(W, 0.1f), x = randn(M * K), xlo(M * K);
        auto wb = to_bf16_bits(w), biasb = to_bf16_bits(bias);
        std::vector<float> xh = x;
        auto xhb = to_bf16_bits(xh);
        for (int64_t i = 0; i < M * K; ++i) xlo[i] = x[i] - xh[i];
        auto xlb = to_bf16_bits(xlo);
        const std::vector<int32_t> pos = {37, 5}, row = {1, 0}, tables = {3, 2, 1, 0, 7, 6, 5, 4};
        Dev<float> dinv(inv), qkv(M * W);
        Dev<int32_t> dpos(pos), drow(row), dtab(tables);
        Dev<uint16_t> dw(wb), dbias(biasb), dxh(xhb), dxl(xlb);
        const int64_t cache = 8 * bs * n_kv * hd;
        auto run = [&](bool fused, const gpu::GemvIn& in) {
          Dev<uint16_t> k(std::vector<uint16_t>(cache, 0)), v(std::vector<uint16_t>(cache, 0)), q(M * H * hd);
          const gpu::PagedKv pk{B(k), B(v), dtab.p, static_cast<int32_t>(max_blocks), static_cast<int32_t>(bs), static_cast<int32_t>(n_kv),
                                static_cast<int32_t>(hd)};
          if (fused) {
            gpu::gemv_rope_kv(in, B(dw), B(dbias), dpos.p, drow.p, dinv.p, H, pk, B(q), M, K, nullptr, true);
          } else {
            gpu::gemv(in.x, B(dw), qkv.p, M, W, K, nullptr, false, in.x_lo);
            gpu::rope_kv_append(qkv.p, nullptr, B(dbias), dpos.p, drow.p, dinv.p, M, H, pk, B(q), nullptr);
          }
          return std::array<std::vector<uint16_t>, 3>{q.get(), k.get(), v.get()};
        };
        const auto unfused = run(false, gpu::GemvIn{B(dxh), B(dxl)});
        CHECK(run(true, gpu::GemvIn{B(dxh), B(dxl)}) == unfused);
        // The normalised input against the same path fed with xn in float (hi + lo carries ~16 bits).
        std::vector<float> xnh = xn, xnl(M * K);
        auto xnhb = to_bf16_bits(xnh);
        for (int64_t i = 0; i < M * K; ++i) xnl[i] = xn[i] - xnh[i];
        auto xnlb = to_bf16_bits(xnl);
        Dev<uint16_t> dnh(xnhb), dnl(xnlb);
        const auto want = run(false, gpu::GemvIn{B(dnh), B(dnl)});
        const auto got = run(true, norm);
        for (int i = 0; i < 3; ++i) {
          CAPTURE(i);
          const std::vector<float> wf = bits_to_f32(want[i]);
          CHECK(rel(bits_to_f32(got[i]), wf) < 1e-2);
          CHECK(*std::max_element(wf.begin(), wf.end()) > 0.5f);  // written, not left zero
        }
      }
    }
  }

  TEST_CASE("NF4 / NF4-DQ / Q8 on the GPU: quantisation bit for bit as the host's, GEMVs dequantising in registers, cuBLAS over dequantised tiles") {
    cublasHandle_t h;
    CUBLAS_CHECK(cublasCreate(&h));
    for (DType t : {DType::kNF4, DType::kNF4DQ, DType::kQ8})
    for (const int64_t K : {int64_t{1088}, int64_t{1280}}) {  // 17 blocks of 64 (the CUDA-core NF4 kernel); 5 x 256 (the tensor-core one)
      CAPTURE(dtype_name(t));
      CAPTURE(K);
      const int64_t N = 301;  // odd
      std::vector<float> w = randn(N * K, 0.05f);
      w[5] = 0.9f;                                           // an outlier block / row
      std::fill(w.begin() + 2 * K, w.begin() + 3 * K, 0.0f);  // a zero row
      auto wb = to_bf16_bits(w);
      const int64_t bytes = quant_layout(t, N, K).bytes;
      std::vector<uint8_t> host(bytes);
      quantize_weight(t, w.data(), N, K, host.data());
      Dev<uint16_t> dw(wb);
      Dev<uint8_t> blob(std::vector<uint8_t>(bytes, 0));
      Dev<float> stage(std::max<int64_t>(1, quant_stage_floats(t, N, K)));  // NF4-DQ's fp32 absmax
      for (int64_t r0 = 0; r0 < N; r0 += 100)  // a few rows at a time, as the executor generates them
        gpu::quantize_rows(t, reinterpret_cast<bf16*>(dw.p) + r0 * K, N, K, r0, std::min(N, r0 + 100), blob.p, nullptr, stage.p);
      gpu::finish_quant(t, N, K, stage.p, blob.p, nullptr);
      CHECK(blob.get() == host);
      if (t == DType::kNF4DQ) {  // a fused weight of two parts, each with its own statistics (256 rows x 17 absmax: blocks of 256)
        const int64_t N2 = 512;
        std::vector<float> w2 = randn(N2 * K, 0.05f);
        for (int64_t i = 256 * K; i < N2 * K; ++i) w2[i] *= 8;  // the second part at another scale
        const auto w2b = to_bf16_bits(w2);
        for (int64_t i = 0; i < N2 * K; ++i) w2[i] = bf16_to_f32(w2b[i]);  // the host quantises the same BF16 values
        const QuantLayout l2 = quant_layout(t, N2, K);
        std::vector<uint8_t> host2(l2.bytes, 0);
        std::vector<float> hstage(quant_stage_floats(t, N2, K));
        quantize_rows(t, w2.data(), N2, K, 0, N2, host2.data(), hstage.data());
        finish_quant(t, N2, K, hstage.data(), host2.data(), {256, 256});
        Dev<uint16_t> dw2(w2b);
        Dev<uint8_t> blob2(std::vector<uint8_t>(l2.bytes, 0));
        Dev<float> stage2(hstage.size());
        gpu::quantize_rows(t, reinterpret_cast<bf16*>(dw2.p), N2, K, 0, N2, blob2.p, nullptr, stage2.p);
        gpu::finish_quant(t, N2, K, stage2.p, blob2.p, nullptr, {256, 256});
        CHECK(blob2.get() == host2);
        float m0 = 0, m1 = 0;
        std::memcpy(&m0, host2.data() + l2.means, 4);
        std::memcpy(&m1, host2.data() + l2.means + 4 * (l2.n_scales2 - 1), 4);
        CHECK(m1 > 4 * m0);  // two means
      }
      // The dequantised weights in float: the reference of every product below. The tensor-core
      // NF4 kernel's code values are BF16 unless `precise` (kernels.h): its reference is the same
      // weights with each code value rounded to BF16 (code * absmax -> bf16(code) * absmax).
      std::vector<float> wq(N * K), wq_b(N * K);
      dequantize_rows(t, host.data(), N, K, 0, N, wq.data());
      for (int64_t i = 0; i < N * K; ++i) {
        const uint8_t byte = host[static_cast<size_t>(i / 2)];
        const float c = kNf4Codes[i % 2 == 0 ? byte >> 4 : byte & 15];
        wq_b[i] = is_nf4(t) && c != 0.0f ? static_cast<float>(static_cast<double>(wq[i]) * bf16_to_f32(f32_to_bf16(c)) / c) : wq[i];
      }
      for (int64_t M = 1; M <= gpu::kGemvMaxRows; ++M) {
        std::vector<float> x = randn(M * K);
        auto xb = to_bf16_bits(x);
        const std::vector<float> ref = ref_matmul(x, wq, M, N, K);
        Dev<uint16_t> dx(xb);
        Dev<float> y(M * N);
        gpu::gemv_store(gpu::GemvIn{reinterpret_cast<bf16*>(dx.p)}, gpu::GemvW{blob.p, t}, y.p, M, N, K, nullptr);
        CAPTURE(M);
        const bool mma = K % 256 == 0 && gpu::nf4_mma_path(t, M, false);
        CHECK(rel(y.get(), mma ? ref_matmul(x, wq_b, M, N, K) : ref) < 1e-5);
        if (mma) {
          CHECK(rel(y.get(), ref) > 1e-5);  // the BF16 code values show (this check can fail)
          CHECK(rel(y.get(), ref) < 5e-3);
        }
        if (mma) {  // three blocks, so each takes several groups of row tiles (N = 301: 19 or 10 groups)
          gpu::set_nf4_grid_cap(3);
          Dev<float> yc(M * N);
          gpu::gemv_store(gpu::GemvIn{reinterpret_cast<bf16*>(dx.p)}, gpu::GemvW{blob.p, t}, yc.p, M, N, K, nullptr);
          gpu::set_nf4_grid_cap(-1);
          CHECK(yc.get() == y.get());
        }
        if (mma && M == 1) {  // one column through each code table (by default the format and size pick one)
          for (int table : {0, 1}) {
            CAPTURE(table);
            gpu::set_nf4_table(table);
            Dev<float> yt(N);
            gpu::gemv_store(gpu::GemvIn{reinterpret_cast<bf16*>(dx.p)}, gpu::GemvW{blob.p, t}, yt.p, M, N, K, nullptr);
            CHECK(rel(yt.get(), ref_matmul(x, wq_b, M, N, K)) < 1e-5);
          }
          gpu::set_nf4_table(-1);
        }
        // Precise codes (the QKV's): the float reference.
        Dev<float> yp(M * N);
        gpu::gemv_store(gpu::GemvIn{reinterpret_cast<bf16*>(dx.p)}, gpu::GemvW{blob.p, t, true}, yp.p, M, N, K, nullptr);
        CHECK(rel(yp.get(), ref) < 1e-5);
        if (M <= 4) {  // hi + lo rows (the QKV's input): the product of their float sums
          std::vector<float> lo = randn(M * K, 0.01f);
          auto lob = to_bf16_bits(lo);
          std::vector<float> sum(M * K);
          for (int64_t i = 0; i < M * K; ++i) sum[i] = bf16_to_f32(xb[i]) + bf16_to_f32(lob[i]);
          Dev<uint16_t> dlo(lob);
          Dev<float> yl(M * N);
          gpu::gemv_store(gpu::GemvIn{reinterpret_cast<bf16*>(dx.p), reinterpret_cast<bf16*>(dlo.p)}, gpu::GemvW{blob.p, t, true}, yl.p, M, N, K, nullptr);
          CHECK(rel(yl.get(), ref_matmul(sum, wq, M, N, K)) < 1e-5);
          // Not precise: the tensor-core kernel where it takes 2M columns.
          gpu::gemv_store(gpu::GemvIn{reinterpret_cast<bf16*>(dx.p), reinterpret_cast<bf16*>(dlo.p)}, gpu::GemvW{blob.p, t}, yl.p, M, N, K, nullptr);
          const bool mma2 = K % 256 == 0 && gpu::nf4_mma_path(t, M, true);
          CHECK(rel(yl.get(), ref_matmul(sum, mma2 ? wq_b : wq, M, N, K)) < 1e-5);
          // FP16 hi + lo rows (the QKV's input where nf4_f16_path): FP16 code values on the tensor
          // cores; every other path refuses them.
          std::vector<uint16_t> h16(M * K), l16(M * K);
          std::vector<float> s16(M * K);
          for (int64_t i = 0; i < M * K; ++i) {
            const _Float16 hv = static_cast<_Float16>(sum[i]);
            const _Float16 lv = static_cast<_Float16>(sum[i] - static_cast<float>(hv));
            std::memcpy(&h16[i], &hv, 2);
            std::memcpy(&l16[i], &lv, 2);
            s16[i] = static_cast<float>(hv) + static_cast<float>(lv);
          }
          Dev<uint16_t> dh16(h16), dl16(l16);
          gpu::GemvIn fin{reinterpret_cast<bf16*>(dh16.p), reinterpret_cast<bf16*>(dl16.p)};
          fin.f16 = true;
          if (gpu::nf4_f16_path(t, M, K)) {
            std::vector<float> wq_h(N * K);
            for (int64_t i = 0; i < N * K; ++i) {
              const uint8_t byte = host[static_cast<size_t>(i / 2)];
              const float c = kNf4Codes[i % 2 == 0 ? byte >> 4 : byte & 15];
              wq_h[i] = c != 0.0f ? static_cast<float>(static_cast<double>(wq[i]) * static_cast<float>(static_cast<_Float16>(c)) / c) : wq[i];
            }
            gpu::gemv_store(fin, gpu::GemvW{blob.p, t, true}, yl.p, M, N, K, nullptr);
            CHECK(rel(yl.get(), ref_matmul(s16, wq_h, M, N, K)) < 1e-5);
            const double e16 = rel(yl.get(), ref_matmul(sum, wq, M, N, K));
            CHECK(e16 > 1e-5);  // the FP16 code values show (this check can fail)
            CHECK(e16 < 2e-3);  // and are closer than BF16's (5e-3 above)
          } else {
            CHECK_THROWS_AS(gpu::gemv_store(fin, gpu::GemvW{blob.p, t, true}, yl.p, M, N, K, nullptr), gpu::CudaError);
          }
        }
        if (M == 3) {  // cuBLAS over BF16 tiles of the dequantised rows, written into a wider output's columns
          Dev<uint16_t> tile(N * K);
          Dev<float> yt(M * N);
          gpu::dequantize_rows(t, blob.p, N, K, 0, 150, reinterpret_cast<bf16*>(tile.p), nullptr);
          gpu::dequantize_rows(t, blob.p, N, K, 150, N, reinterpret_cast<bf16*>(tile.p) + 150 * K, nullptr);
          gpu::gemm_ld(h, reinterpret_cast<bf16*>(dx.p), reinterpret_cast<bf16*>(tile.p), yt.p, M, 150, K, N);
          gpu::gemm_ld(h, reinterpret_cast<bf16*>(dx.p), reinterpret_cast<bf16*>(tile.p) + 150 * K, yt.p + 150, M, N - 150, K, N);
          CHECK(rel(yt.get(), ref) < 1e-2);  // the tile is BF16
        }
      }
      // The dequantised tile itself: each element the host's value rounded to BF16, the lo part the
      // remainder rounded again; through the 16-element kernel (aligned output) and the one-element
      // one (output 2 bytes off 16).
      {
        std::vector<float> rounded = wq;
        const std::vector<uint16_t> hi_ref = to_bf16_bits(rounded);
        std::vector<float> rem(N * K);
        for (int64_t i = 0; i < N * K; ++i) rem[i] = wq[i] - bf16_to_f32(hi_ref[i]);
        const std::vector<uint16_t> lo_ref = to_bf16_bits(rem);
        for (int64_t off : {0, 1}) {
          CAPTURE(off);
          Dev<uint16_t> hi(N * K + 1), lo(N * K + 1);
          gpu::dequantize_rows(t, blob.p, N, K, 0, N, reinterpret_cast<bf16*>(hi.p) + off, nullptr, reinterpret_cast<bf16*>(lo.p) + off);
          const std::vector<uint16_t> h = hi.get(), l = lo.get();
          CHECK(std::equal(hi_ref.begin(), hi_ref.end(), h.begin() + off));
          CHECK(std::equal(lo_ref.begin(), lo_ref.end(), l.begin() + off));
        }
      }
      // The fused SwiGLU epilogue over quantised gate/up rows: the same as the product, then SwiGLU.
      const int64_t F = 150;
      std::vector<float> x = randn(2 * K);
      auto xb = to_bf16_bits(x);
      Dev<uint16_t> dx(xb), hf(2 * F), hr(2 * F);
      Dev<float> gu(2 * 2 * F);
      const int64_t bytes2 = quant_layout(t, 2 * F, K).bytes;
      std::vector<uint8_t> host2(bytes2);
      quantize_weight(t, w.data(), 2 * F, K, host2.data());
      Dev<uint8_t> blob2(host2);
      gpu::gemv_store(gpu::GemvIn{reinterpret_cast<bf16*>(dx.p)}, gpu::GemvW{blob2.p, t}, gu.p, 2, 2 * F, K, nullptr);
      gpu::swiglu(gu.p, 2, F, reinterpret_cast<bf16*>(hr.p), nullptr);
      gpu::gemv_swiglu(gpu::GemvIn{reinterpret_cast<bf16*>(dx.p)}, gpu::GemvW{blob2.p, t}, reinterpret_cast<bf16*>(hf.p), 2, F, K, nullptr);
      CHECK(hf.get() == hr.get());
      gpu::set_nf4_grid_cap(2);  // (the tensor-core kernel: two blocks, several groups each)
      gpu::gemv_swiglu(gpu::GemvIn{reinterpret_cast<bf16*>(dx.p)}, gpu::GemvW{blob2.p, t}, reinterpret_cast<bf16*>(hf.p), 2, F, K, nullptr);
      gpu::set_nf4_grid_cap(-1);
      CHECK(hf.get() == hr.get());
    }
    cublasDestroy(h);
  }

  TEST_CASE("embedding, add_rmsnorm (with residual, with gathered rows), swiglu, argmax, conversions") {
    for (int64_t E : {8, 36, 288, 4096, 5120}) {
      const int64_t T = 5, V = 37;
      std::vector<float> table = randn(V * E);
      auto tb = to_bf16_bits(table);
      std::vector<int32_t> ids = {0, 36, 7, 7, 20};
      Dev<uint16_t> dt(tb);
      Dev<int32_t> di(ids);
      Dev<float> dx(T * E);
      gpu::embedding(reinterpret_cast<bf16*>(dt.p), di.p, T, E, dx.p, nullptr);
      std::vector<float> x = dx.get();
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < E; ++i) REQUIRE(x[t * E + i] == table[ids[t] * E + i]);
      // The table in pinned host memory (the plan's embedding_on_host), 16-byte aligned and one
      // element past that (the one-element kernel): the same rows over PCIe.
      uint16_t* host = nullptr;
      CUDA_CHECK(cudaMallocHost(&host, (V * E + 1) * 2));
      for (int64_t off : {0, 1}) {
        CAPTURE(off);
        std::memcpy(host + off, tb.data(), tb.size() * 2);
        Dev<float> hx(T * E);
        gpu::embedding(reinterpret_cast<const bf16*>(host + off), di.p, T, E, hx.p, nullptr);
        CHECK(hx.get() == x);
      }
      CUDA_CHECK(cudaFreeHost(host));
      if (E % 8 != 0) continue;  // the embedding's one-element kernel only

      std::vector<float> delta = randn(T * E), w = randn(E, 0.3f);
      auto wb = to_bf16_bits(w);
      Dev<float> dd(delta);
      Dev<uint16_t> dw(wb), dout(T * E);
      gpu::add_rmsnorm(dx.p, dd.p, reinterpret_cast<bf16*>(dw.p), nullptr, T, E, 1e-5f, reinterpret_cast<bf16*>(dout.p), nullptr);
      std::vector<float> xr(T * E), ref(T * E);
      for (int64_t i = 0; i < T * E; ++i) xr[i] = x[i] + delta[i];
      TensorView wv = TensorView::contiguous(wb.data(), DType::kBF16, {E});
      cpu::rmsnorm(xr.data(), wv, 1e-5, T, E, ref.data());
      CHECK(rel(dx.get(), xr) < 1e-6);
      CHECK(rel(bits_to_f32(dout.get()), ref) < 1e-2);
      // Gathered rows (the head): rows 4 and 1 only.
      std::vector<int32_t> rows = {4, 1};
      Dev<int32_t> dr(rows);
      Dev<uint16_t> dout2(2 * E);
      gpu::add_rmsnorm(dx.p, nullptr, reinterpret_cast<bf16*>(dw.p), dr.p, 2, E, 1e-5f, reinterpret_cast<bf16*>(dout2.p), nullptr);
      std::vector<float> got = bits_to_f32(dout2.get());
      std::vector<float> want(ref.begin() + 4 * E, ref.begin() + 5 * E);
      want.insert(want.end(), ref.begin() + 1 * E, ref.begin() + 2 * E);
      CHECK(rel(got, want) < 1e-2);
      // hi + lo carries the normed values to ~2^-16 relative.
      Dev<uint16_t> hi(T * E), lo(T * E);
      gpu::add_rmsnorm(dx.p, nullptr, reinterpret_cast<bf16*>(dw.p), nullptr, T, E, 1e-5f, reinterpret_cast<bf16*>(hi.p), nullptr,
                       reinterpret_cast<bf16*>(lo.p));
      std::vector<float> h = bits_to_f32(hi.get()), l2 = bits_to_f32(lo.get()), sum(T * E);
      for (int64_t i = 0; i < T * E; ++i) sum[i] = h[i] + l2[i];
      CHECK(rel(sum, ref) < 2e-5);
      // The same as FP16 hi + lo (the NF4 QKV's input): ~2^-22, and hi alone FP16-rounded.
      gpu::add_rmsnorm(dx.p, nullptr, reinterpret_cast<bf16*>(dw.p), nullptr, T, E, 1e-5f, reinterpret_cast<bf16*>(hi.p), nullptr,
                       reinterpret_cast<bf16*>(lo.p), true);
      const std::vector<uint16_t> h16 = hi.get(), l16 = lo.get();
      std::vector<float> hf(T * E), sum16(T * E);
      for (int64_t i = 0; i < T * E; ++i) {
        _Float16 a, b;
        std::memcpy(&a, &h16[i], 2);
        std::memcpy(&b, &l16[i], 2);
        hf[i] = static_cast<float>(a);
        sum16[i] = static_cast<float>(a) + static_cast<float>(b);
      }
      CHECK(rel(sum16, ref) < 2e-6);
      CHECK(rel(hf, ref) < 1e-3);
      CHECK(rel(hf, ref) > 1e-5);
    }
    {
      const int64_t T = 3, F = 1000;
      std::vector<float> gu = randn(T * 2 * F, 2.0f);
      Dev<float> dg(gu);
      Dev<uint16_t> dh(T * F);
      gpu::swiglu(dg.p, T, F, reinterpret_cast<bf16*>(dh.p), nullptr);
      std::vector<float> ref(T * F);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < F; ++i) {
          const double g = gu[t * 2 * F + i];
          ref[t * F + i] = static_cast<float>(g / (1 + std::exp(-g)) * gu[t * 2 * F + F + i]);
        }
      CHECK(rel(bits_to_f32(dh.get()), ref) < 1e-2);
    }
    {
      const int64_t R = 4, V = 128256;
      std::vector<float> l = randn(R * V);
      l[0 * V + 77] = 50;
      l[1 * V + V - 1] = 50;
      l[2 * V + 5] = 50;
      l[2 * V + 9] = 50;  // tie: the lower index wins
      Dev<float> dl(l);
      Dev<int32_t> out(R);
      gpu::argmax_rows(dl.p, R, V, out.p, nullptr);
      auto a = out.get();
      CHECK(a[0] == 77);
      CHECK(a[1] == V - 1);
      CHECK(a[2] == 5);
      CHECK(a[3] == argmax(l.data() + 3 * V, V));
    }
    {
      // Top-k sampling: k = 1 is argmax; the same (seed, step) draws the same token; frequencies follow
      // the softmax of the kept tokens, and top-p cuts the tail.
      const int64_t V = 32000;
      std::vector<float> l(V, -30.0f);
      l[10] = 2.0f;
      l[20] = 1.9f;
      l[30] = 0.1f;
      l[40] = -1.0f;
      Dev<float> dl(l);
      std::vector<uint64_t> seeds = {7};
      Dev<uint64_t> ds(seeds);
      Dev<int32_t> out(1);
      gpu::topk_sample(dl.p, 1, V, 1, 1.0f, 1.0f, ds.p, 0, out.p, nullptr);
      CHECK(out.get()[0] == 10);
      int counts[4] = {};
      for (uint64_t step = 0; step < 3000; ++step) {
        gpu::topk_sample(dl.p, 1, V, 4, 1.0f, 1.0f, ds.p, step, out.p, nullptr);
        const int32_t x = out.get()[0];
        REQUIRE((x == 10 || x == 20 || x == 30 || x == 40));
        ++counts[x / 10 - 1];
        if (step == 5) {
          gpu::topk_sample(dl.p, 1, V, 4, 1.0f, 1.0f, ds.p, step, out.p, nullptr);
          CHECK(out.get()[0] == x);
        }
      }
      // softmax(2, 1.9, 0.1, -1): 0.475, 0.430, 0.071, 0.024
      CHECK(counts[0] == doctest::Approx(0.475 * 3000).epsilon(0.1));
      CHECK(counts[1] == doctest::Approx(0.430 * 3000).epsilon(0.1));
      CHECK(counts[2] > 100);
      CHECK(counts[3] > 20);
      for (uint64_t step = 0; step < 200; ++step) {
        gpu::topk_sample(dl.p, 1, V, 4, 1.0f, 0.5f, ds.p, step, out.p, nullptr);
        const int32_t x = out.get()[0];
        CHECK((x == 10 || x == 20));  // p(10) = 0.475 < 0.5: the nucleus is {10, 20}
      }
    }
    {
      std::vector<float> f = randn(1000);
      Dev<float> df(f);
      Dev<uint16_t> db(1000);
      gpu::to_bf16(df.p, 0, 1000, reinterpret_cast<bf16*>(db.p), nullptr);
      auto b = db.get();
      for (int i = 0; i < 1000; ++i) CHECK(b[i] == f32_to_bf16(f[i]));
      // Synthetic weights: bit-for-bit the host generator.
      std::vector<uint16_t> host(4096);
      synthetic_fill_bf16("model.layers.3.mlp.up_proj.weight", 4096, false, 0, 4096, host.data());
      Dev<uint16_t> dev(4096);
      gpu::synthetic_fill(synthetic_key("model.layers.3.mlp.up_proj.weight"), synthetic_scale(4096, false), false, 4096,
                          reinterpret_cast<bf16*>(dev.p), nullptr);
      CHECK(dev.get() == host);
      synthetic_fill_bf16("model.norm.weight", 4096, true, 0, 4096, host.data());
      gpu::synthetic_fill(synthetic_key("model.norm.weight"), synthetic_scale(4096, true), true, 4096, reinterpret_cast<bf16*>(dev.p), nullptr);
      CHECK(dev.get() == host);
      // copy_by_kernel: pinned host memory read through its mapped address, any length (16-byte
      // words and a byte tail); the bytes around the copy are left alone.
      uint8_t* pinned = nullptr;
      CUDA_CHECK(cudaMallocHost(&pinned, 8192));
      for (int i = 0; i < 8192; ++i) pinned[i] = static_cast<uint8_t>(i * 7 + 3);
      for (int64_t bytes : {1, 4, 15, 16, 17, 100, 4099, 8192}) {
        Dev<uint8_t> d(std::vector<uint8_t>(8192 + 16, 0xEE));
        gpu::copy_by_kernel(pinned, d.p, bytes, nullptr);
        const auto got = d.get();
        CAPTURE(bytes);
        CHECK(std::equal(got.begin(), got.begin() + bytes, pinned));
        CHECK(std::all_of(got.begin() + bytes, got.end(), [](uint8_t v) { return v == 0xEE; }));
      }
      cudaFreeHost(pinned);
    }
  }

  TEST_CASE("rope + KV append + paged attention against the CPU ops: GQA 1/2/3/4/8, head_dim 32..128, windows, splits, both kernels") {
    for (int64_t hd : {32, 64, 128}) {
      for (int64_t group : {1, 2, 3, 4, 8}) {
        for (int64_t window : {0, 9}) {
          const int64_t n_kv = 2, H = n_kv * group, bs = 16;
          const std::vector<int64_t> lens = {1, 37, 300};
          KvCacheShape shape{1, n_kv, hd, bs, 64};
          auto kvr = KvCache::create(shape);
          REQUIRE(kvr.ok());
          KvCache& kv = *kvr;
          // Fill every position through the rope/append kernel, one step per sequence (prefill).
          ModelConfig c;
          c.head_dim = hd;
          c.rope_theta = 10000;
          c.dtype = DType::kBF16;
          const std::vector<float> inv = rope_inv_freq(c);
          Dev<float> dinv(inv);
          const int64_t width = (H + 2 * n_kv) * hd;
          Dev<uint16_t> dk(shape.n_blocks * bs * n_kv * hd), dv(shape.n_blocks * bs * n_kv * hd);
          std::vector<int32_t> seqs;
          for (size_t si = 0; si < lens.size(); ++si) {
            const int32_t s = kv.add_sequence();
            seqs.push_back(s);
            REQUIRE(kv.reserve(s, lens[si]).ok());
          }
          const int32_t max_blocks = 64;
          std::vector<int32_t> tables(lens.size() * max_blocks, 0);
          for (size_t si = 0; si < lens.size(); ++si) {
            const auto& bt = kv.block_table(seqs[si]);
            std::copy(bt.begin(), bt.end(), tables.begin() + si * max_blocks);
          }
          Dev<int32_t> dtab(tables);
          gpu::PagedKv pk{reinterpret_cast<bf16*>(dk.p), reinterpret_cast<bf16*>(dv.p), dtab.p, max_blocks, static_cast<int32_t>(bs),
                          static_cast<int32_t>(n_kv), static_cast<int32_t>(hd)};
          std::vector<float> q_last;  // the GPU-rotated q of every token, for the CPU check
          std::vector<int32_t> all_pos, all_row;
          std::vector<float> all_qkv;
          for (size_t si = 0; si < lens.size(); ++si) {
            const int64_t L = lens[si];
            std::vector<float> qkv = randn(L * width);
            std::vector<int32_t> pos(L), row(L, static_cast<int32_t>(si));
            for (int64_t p = 0; p < L; ++p) pos[p] = static_cast<int32_t>(p);
            Dev<float> dqkv(qkv);
            Dev<uint16_t> dq(L * H * hd);
            Dev<int32_t> dpos(pos), drow(row);
            gpu::rope_kv_append(dqkv.p, nullptr, nullptr, dpos.p, drow.p, dinv.p, L, H, pk, reinterpret_cast<bf16*>(dq.p), nullptr);
            CUDA_CHECK(cudaDeviceSynchronize());
            // CPU twin: rotate k with the CPU rope and store exact float K/V in the host cache.
            std::vector<float> k(L * n_kv * hd), v(L * n_kv * hd);
            for (int64_t t = 0; t < L; ++t)
              for (int64_t i = 0; i < n_kv * hd; ++i) {
                k[t * n_kv * hd + i] = qkv[t * width + H * hd + i];
                v[t * n_kv * hd + i] = qkv[t * width + (H + n_kv) * hd + i];
              }
            cpu::rope(k.data(), L, n_kv, hd, pos.data(), inv.data());
            for (int64_t t = 0; t < L; ++t) kv.append(0, seqs[si], t, k.data() + t * n_kv * hd, v.data() + t * n_kv * hd);
            kv.set_length(seqs[si], L);
            // q as the GPU rotated it, and the CPU's rotation of the same input.
            std::vector<float> qg = bits_to_f32(dq.get());
            std::vector<float> qc(L * H * hd);
            for (int64_t t = 0; t < L; ++t)
              for (int64_t i = 0; i < H * hd; ++i) qc[t * H * hd + i] = qkv[t * width + i];
            cpu::rope(qc.data(), L, H, hd, pos.data(), inv.data());
            CHECK(rel(qg, qc) < 1e-2);
            q_last.insert(q_last.end(), qg.begin(), qg.end());
            all_pos.insert(all_pos.end(), pos.begin(), pos.end());
            all_row.insert(all_row.end(), row.begin(), row.end());
          }
          // K/V in the GPU cache equal the CPU's (bf16-rounded).
          {
            auto kg = bits_to_f32(dk.get());
            const int64_t L = lens[2];
            for (int64_t t = 0; t < L; t += 17) {
              const auto& bt = kv.block_table(seqs[2]);
              std::vector<float> kc(n_kv * hd), vc(n_kv * hd);
              kv.read(0, seqs[2], t, kc.data(), vc.data());
              for (int64_t i = 0; i < n_kv * hd; ++i) {
                const float g = kg[(bt[t / bs] * bs + t % bs) * n_kv * hd + i];
                CHECK(std::fabs(g - kc[i]) <= 1e-2f * std::max(1.0f, std::fabs(kc[i])));
              }
            }
          }
          // Attention for every token of every sequence, with 1 and with several splits.
          const int64_t T = static_cast<int64_t>(all_pos.size());
          std::vector<int32_t> seq_of(T);
          for (int64_t t = 0; t < T; ++t) seq_of[t] = seqs[all_row[t]];
          std::vector<float> ref(T * H * hd);
          cpu::attention(q_last.data(), T, all_pos.data(), seq_of.data(), H, window, 0, kv, ref.data());
          auto qbits = to_bf16_bits(q_last);
          Dev<uint16_t> dq(qbits), dout(T * H * hd);
          Dev<int32_t> dpos(all_pos), drow(all_row);
          Dev<float> scratch(T * H * 8 * (hd + 2));
          // Query tiles: CUDA-core tiles only (runs within one sequence), and as the executor builds
          // them for prefill (the runs of 37 and 300 tokens on tensor cores, the 1-token run not).
          std::vector<int32_t> tiles(2 * T), mtiles(2 * T);
          gpu::QueryTiles cq = gpu::build_query_tiles(all_row.data(), T, H, n_kv, hd, false, tiles.data());
          const int64_t qt = gpu::query_tile_tokens(H, n_kv);
          CHECK(cq.n_mma == 0);
          CHECK(cq.n == 1 + (lens[1] + qt - 1) / qt + (lens[2] + qt - 1) / qt);
          gpu::QueryTiles mq = gpu::build_query_tiles(all_row.data(), T, H, n_kv, hd, true, mtiles.data());
          const int64_t mt = 64 / group;  // tokens per tensor-core tile
          CHECK(mq.n_mma == (lens[1] + mt - 1) / mt + (lens[2] + mt - 1) / mt);
          CHECK(mq.n == mq.n_mma + 1);
          Dev<int32_t> dtiles(tiles), dmtiles(mtiles);
          cq.d = dtiles.p;
          mq.d = dmtiles.p;
          for (int tiled = 0; tiled < 3; ++tiled) {
            for (int splits : {1, 3, 8}) {
              const gpu::QueryTiles qts = tiled == 0 ? gpu::QueryTiles{} : tiled == 1 ? cq : mq;
              gpu::attention(reinterpret_cast<bf16*>(dq.p), dpos.p, drow.p, qts, T, H, window, pk, splits, scratch.p, reinterpret_cast<bf16*>(dout.p),
                             nullptr);
              CAPTURE(hd);
              CAPTURE(group);
              CAPTURE(window);
              CAPTURE(splits);
              CAPTURE(tiled);
              CHECK(rel(bits_to_f32(dout.get()), ref) < 2e-2);
            }
          }
        }
      }
    }
  }
}

namespace {

struct GpuModel {
  Model model;
  std::unique_ptr<gpu::GpuExecutor> ex;
  std::unique_ptr<KvCache> kv;
  std::unique_ptr<Runner> runner;
};

// `places`: a letter per layer, repeated over the model's layers: R resident, S streamed from host,
// D streamed from disk, C on the CPU (empty: as n_resident says); `disk`: a packed store to load from.
GpuModel load_gpu(const std::string& dir, int64_t kv_tokens = 4096, bool graphs = true, int64_t n_resident = -1,
                  const std::string& places = "", const std::string& disk = "", bool kv_host = false, int micro_batches = 2,
                  const std::string& kv_pattern = "", DType quant = DType::kBF16, bool embedding_on_host = false,
                  DType quant_head = DType::kBF16) {
  GpuModel g;
  auto m = load_model(dir, LoadOptions{.synthetic_layers = 0, .need_tokenizer = false, .disk = disk, .quant = quant, .quant_head = quant_head});
  REQUIRE_MESSAGE(m.ok(), m.status().message());
  g.model = std::move(*m);
  KvCacheShape s{g.model.config.n_layers, g.model.config.n_kv_heads, g.model.config.head_dim, 16, kv_tokens / 16};
  gpu::GpuOptions o;
  o.cuda_graphs = graphs;
  o.n_resident_layers = n_resident;
  o.kv_on_host = kv_host;
  o.micro_batches = micro_batches;
  o.plan.embedding_on_host = embedding_on_host;
  std::vector<bool> host_kv(g.model.config.n_layers, kv_host);
  for (int64_t il = 0; !places.empty() && il < g.model.config.n_layers; ++il) {
    const char c = places[il % places.size()];
    o.plan.place.push_back(c == 'R' ? Place::kResident : c == 'C' ? Place::kCpu : Place::kStreamed);
    o.plan.source.push_back(c == 'R' ? Tier::kDevice : c == 'D' ? Tier::kDisk : Tier::kPinnedHost);
    host_kv[il] = kv_host || c == 'C';
  }
  // `kv_pattern`: a letter per layer, repeated: H host K/V, G GPU K/V (mixed placements, --kv split).
  if (!kv_pattern.empty()) {
    if (o.plan.place.empty())
      for (int64_t il = 0; il < g.model.config.n_layers; ++il) {
        o.plan.place.push_back(Place::kResident);
        o.plan.source.push_back(Tier::kDevice);
      }
    for (int64_t il = 0; il < g.model.config.n_layers; ++il) host_kv[il] = host_kv[il] || kv_pattern[il % kv_pattern.size()] == 'H';
    kv_host = true;
  }
  if (!o.plan.place.empty()) o.plan.kv_host = host_kv;
  if (kv_host) s.dtype = DType::kBF16;  // as the CLI makes it
  auto ex = gpu::GpuExecutor::create(*g.model.weights, s, o);
  REQUIRE_MESSAGE(ex.ok(), ex.status().message());
  g.ex = std::move(*ex);
  auto kv = KvCache::create(s, host_kv);
  REQUIRE(kv.ok());
  g.kv = std::make_unique<KvCache>(std::move(*kv));
  g.runner = std::make_unique<Runner>(*g.model.weights, *g.ex, *g.kv);
  return g;
}

// Logits of every position of `ids` from the float32 CPU backend (the reference the GPU is held to).
std::vector<float> cpu_logits(const std::string& dir, const std::vector<int32_t>& ids) {
  auto cm = load_model(dir, LoadOptions{.synthetic_layers = 0, .need_tokenizer = false});
  REQUIRE(cm.ok());
  cpu::CpuExecutor cex(cm->config);
  const int64_t blocks = (static_cast<int64_t>(ids.size()) + 15) / 16;
  auto ckv = KvCache::create({cm->config.n_layers, cm->config.n_kv_heads, cm->config.head_dim, 16, blocks});
  REQUIRE(ckv.ok());
  Runner cr(*cm->weights, cex, *ckv);
  auto l = prompt_logits(cr, ids);
  REQUIRE(l.ok());
  return std::move(*l);
}

// max|logit difference| allowed before a reference margin counts as unclear: twice the measured error.
double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, static_cast<double>(std::fabs(a[i] - b[i])));
  return d;
}

}  // namespace

TEST_SUITE("gpu_model") {
  TEST_CASE("golden logits and greedy ids on the GPU backend (BF16 tolerance)") {
    for (const char* name : {"llama-gqa", "llama3-tied", "qwen2-bias"}) {
      const std::string dir = test::shared_dir() + "/golden/" + name;
      GpuModel g = load_gpu(dir);
      auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
      REQUIRE(gs.ok());
      const int64_t V = g.model.config.n_vocab;
      for (const char* seq : {"seq0", "seq1"}) {
        const std::string label = std::string(name) + " " + seq;
        CAPTURE(label);
        const auto ids = test::read_i32(**gs, std::string(seq) + ".input_ids");
        const auto ref_logits = test::read_f32(**gs, std::string(seq) + ".logits");
        auto logits = prompt_logits(*g.runner, ids);
        REQUIRE(logits.ok());
        const double err = rel(*logits, ref_logits);
        const double abs_err = max_abs_diff(*logits, ref_logits);
        MESSAGE(std::string(name) << " " << std::string(seq) << " GPU logits max|d|/max|ref| = " << err << " (max|d| " << abs_err << ")");
        CHECK(err <= 2e-2);
        const auto ref_ids = test::read_i32(**gs, std::string(seq) + ".greedy_ids");
        const auto margin = test::read_f32(**gs, std::string(seq) + ".greedy_margin");
        std::vector<int32_t> full = ids;
        full.insert(full.end(), ref_ids.begin(), ref_ids.end() - 1);
        auto tf = prompt_logits(*g.runner, full);
        REQUIRE(tf.ok());
        int checked = 0;
        for (size_t i = 0; i < ref_ids.size(); ++i) {
          if (margin[i] < 2 * abs_err) continue;  // not clear at BF16 precision
          ++checked;
          CHECK_MESSAGE(argmax(tf->data() + (ids.size() - 1 + i) * V, V) == ref_ids[i], "teacher-forced step " << i);
        }
        MESSAGE("  clear-margin steps checked: " << checked << " of " << ref_ids.size());
        // Free-running greedy decode (CUDA graphs, argmax on the GPU): equal up to the first unclear
        // step; once with the prompt in one step, once cut into 3-token chunks (steps without an
        // output row do not synchronise, so their inputs must survive until copied).
        for (int64_t chunk : {512, 3}) {
          GenerateOptions go;
          go.n_predict = static_cast<int64_t>(ref_ids.size());
          go.sampling.temperature = 0;
          go.stop_at_eos = false;
          go.max_step_tokens = chunk;
          auto res = generate(*g.runner, {ids}, go);
          REQUIRE(res.ok());
          CAPTURE(chunk);
          for (size_t i = 0; i < ref_ids.size(); ++i) {
            if (res->tokens[0][i] == ref_ids[i]) continue;
            CHECK_MESSAGE(margin[i] < 2 * abs_err, "greedy step " << i << " differs where the margin is " << margin[i]);
            break;
          }
        }
      }
      CHECK(g.ex->graphs_captured() >= 1);
      CHECK(g.ex->graph_replays() > 0);
    }
  }

  TEST_CASE("bitsandbytes 4-bit and 8-bit checkpoints on the GPU: resident, and streamed + CPU layers, near the float32 logits of bitsandbytes' dequantised weights") {
    // tests/data/bnb4-* (test_model.cpp has the CPU's 1e-5): the GPU's BF16 activations and code values.
    for (const char* name : {"bnb4-nf4-dq", "bnb4-gqa-dq", "bnb8"}) {
      const std::string dir = test::data_dir() + "/" + name;
      auto ref = SafetensorsFile::open(dir + "/ref.safetensors");
      REQUIRE(ref.ok());
      const auto ids = test::read_i32(**ref, "input_ids");
      const auto want = test::read_f32(**ref, "logits");
      for (const std::string places : {"", "SC"}) {
        GpuModel g = load_gpu(dir, 4096, true, -1, places);
        CHECK(is_quantized(linear_dtype(g.model.weights->layer(0))));
        for (int64_t chunk : {int64_t{512}, int64_t{1}}) {
          auto logits = prompt_logits(*g.runner, ids, chunk);
          REQUIRE(logits.ok());
          const double err = rel(*logits, want);
          MESSAGE(std::string(name) << " on the GPU, places '" << places << "', " << chunk << "-token steps: max|d|/max|ref| = " << err);
          CHECK(err <= 2e-2);
        }
      }
    }
  }

  TEST_CASE("--quant nf4 / nf4-dq / int8 on the GPU: the golden NF4 logits (prompt and token by token), streamed and CPU layers, GPU-made synthetic = host-made") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    const auto ids = test::read_i32(**gs, "seq0.input_ids");
    const auto ref = test::read_f32(**gs, "nf4.seq0.logits");
    // Resident, then streamed / CPU-computed layers: prefill through cuBLAS over dequantised tiles,
    // decode (one token a step) through the dequantising GEMVs and the fused layer.
    std::vector<float> decoded;  // resident, one token a step
    for (const std::string places : {"", "RSCS"}) {
      GpuModel g = load_gpu(dir, 4096, true, -1, places, "", false, 2, "", DType::kNF4);
      for (int64_t chunk : {int64_t{512}, int64_t{1}}) {
        auto logits = prompt_logits(*g.runner, ids, chunk);
        REQUIRE(logits.ok());
        const double err = rel(*logits, ref);
        MESSAGE("NF4 on the GPU, places '" << places << "', " << chunk << "-token steps: golden nf4.seq0.logits max|d|/max|ref| = " << err);
        CHECK(err <= 2e-2);
        if (places.empty() && chunk == 1) decoded = std::move(*logits);
      }
    }
    // The tensor-core GEMVs on two blocks, so that every block takes several groups of row tiles (the
    // golden model's are few): the residual's partial sums, SwiGLU and RoPE epilogues across groups
    // give the same decode (the sums of squares add in another order: not bit for bit).
    if (gpu::nf4_mma_path(DType::kNF4, 1, false)) {
      gpu::set_nf4_grid_cap(2);
      {
        GpuModel g = load_gpu(dir, 4096, true, -1, "", "", false, 2, "", DType::kNF4);
        auto logits = prompt_logits(*g.runner, ids, 1);
        REQUIRE(logits.ok());
        const double err = rel(*logits, decoded);
        MESSAGE("NF4 on the GPU, two blocks a tensor-core GEMV, against the default grid: " << err);
        CHECK(err < 1e-3);
        CHECK(rel(*logits, ref) <= 2e-2);
      }
      gpu::set_nf4_grid_cap(-1);
    }
    // int8, NF4-DQ: against the CPU backend with the same quantised weights; int8 with the lm_head
    // quantised too (--quant-head int8 / nf4: the head's GEMV and dequantised tiles).
    for (auto [q, h] : std::vector<std::pair<DType, DType>>{{DType::kQ8, DType::kBF16}, {DType::kNF4DQ, DType::kBF16}, {DType::kQ8, DType::kQ8},
                                                           {DType::kNF4DQ, DType::kNF4}}) {
      CAPTURE(dtype_name(q));
      CAPTURE(dtype_name(h));
      GpuModel g = load_gpu(dir, 4096, true, -1, q == DType::kNF4DQ ? "RSCS" : "", "", false, 2, "", q, false, h);
      CHECK(g.model.weights->globals().t[kLmHead].dtype == h);
      auto cm = load_model(dir, LoadOptions{.need_tokenizer = false, .quant = q, .quant_head = h});
      REQUIRE(cm.ok());
      cpu::CpuExecutor cex(cm->config);
      auto ckv = KvCache::create({cm->config.n_layers, cm->config.n_kv_heads, cm->config.head_dim, 16, 64});
      REQUIRE(ckv.ok());
      Runner cr(*cm->weights, cex, *ckv);
      auto want = prompt_logits(cr, ids);
      REQUIRE(want.ok());
      for (int64_t chunk : {int64_t{512}, int64_t{1}}) {
        auto logits = prompt_logits(*g.runner, ids, chunk);
        REQUIRE(logits.ok());
        const double err = rel(*logits, *want);
        MESSAGE(dtype_name(q) << " (lm_head " << dtype_name(h) << ") on the GPU, " << chunk << "-token steps, against the CPU backend's: " << err);
        CHECK(err <= 2e-2);
      }
    }
    // A synthetic model quantised on the GPU as it is generated (the shape-only store) gives the
    // logits of the same model quantised on the host.
    for (auto [q, h] : std::vector<std::pair<DType, DType>>{{DType::kNF4, DType::kBF16}, {DType::kNF4DQ, DType::kBF16}, {DType::kNF4, DType::kQ8},
                                                           {DType::kNF4DQ, DType::kNF4}}) {
      CAPTURE(dtype_name(q));
      CAPTURE(dtype_name(h));
      std::vector<std::vector<float>> out;
      for (bool host : {false, true}) {
        auto m = load_model("synthetic:llama-2-7b",
                            LoadOptions{.synthetic_layers = 2, .need_tokenizer = false, .host_weights = host, .quant = q, .quant_head = h});
        REQUIRE_MESSAGE(m.ok(), m.status().message());
        KvCacheShape s{m->config.n_layers, m->config.n_kv_heads, m->config.head_dim, 16, 8};
        auto ex = gpu::GpuExecutor::create(*m->weights, s, gpu::GpuOptions{});
        REQUIRE_MESSAGE(ex.ok(), ex.status().message());
        auto kv = KvCache::create(s);
        REQUIRE(kv.ok());
        Runner r(*m->weights, **ex, *kv);
        auto l = prompt_logits(r, {1, 450, 4996, 17354, 1701}, 1);
        REQUIRE(l.ok());
        out.push_back(std::move(*l));
      }
      CHECK(out[0] == out[1]);
    }
  }

  TEST_CASE("held-out shapes (group 5 and 3, odd vocabulary), 333-token prompt: GPU logits within the BF16 bound of the float32 CPU backend") {
    // The CPU backend matches transformers to ~2e-6 (the golden test), so it is the reference here.
    // The prompt runs in one step (tensor-core attention), in 128-token chunks, and one token a step
    // (the decode kernel).
    test::for_each_held_out([](const std::string& dir, const test::HeldOutShape& hs, const std::vector<int32_t>& ids) {
      const std::vector<float> ref = cpu_logits(dir, ids);
      GpuModel g = load_gpu(dir, 512);
      for (int64_t chunk : {512, 128, 1}) {
        auto l = prompt_logits(*g.runner, ids, chunk);
        REQUIRE(l.ok());
        const double err = rel(*l, ref);
        MESSAGE("held-out " << hs.hidden << "/" << hs.heads << "/" << hs.kv_heads << " chunk " << chunk << ": GPU " << test::held_out_report(*l, ref, hs.vocab));
        CAPTURE(chunk);
        CHECK(err <= 2e-2);
      }
    });
  }

  TEST_CASE("non-finite logits on the GPU: greedy and top-k sampling refuse the step") {
    // llama-gqa with its final norm's weight at BF16's largest value: finite weights, infinite logits.
    test::TempDir tmp;
    const std::string src = test::shared_dir() + "/golden/llama-gqa";
    std::filesystem::copy_file(src + "/config.json", tmp / "config.json");
    std::ifstream in(src + "/model.safetensors", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    uint64_t hl;
    std::memcpy(&hl, bytes.data(), 8);
    const std::string header = bytes.substr(8, hl);
    const std::string key = "\"model.norm.weight\"";
    const size_t k = header.find(key), o = header.find("data_offsets", k);
    REQUIRE(k != std::string::npos);
    const uint64_t off = std::stoull(header.substr(header.find('[', o) + 1));
    for (int i = 0; i < 256; ++i) {
      const uint16_t big = 0x7f7f;
      std::memcpy(bytes.data() + 8 + hl + off + 2 * i, &big, 2);
    }
    std::ofstream(tmp / "model.safetensors", std::ios::binary) << bytes;
    GpuModel g = load_gpu(tmp.path.string());
    for (float temp : {0.0f, 0.8f}) {
      GenerateOptions go;
      go.n_predict = 3;
      go.sampling.temperature = temp;
      go.sampling.top_k = 40;
      auto res = generate(*g.runner, {{1, 2, 3}}, go);
      CAPTURE(temp);
      REQUIRE(!res.ok());
      CHECK(res.status().message().find("NaN or an infinity") != std::string::npos);
    }
  }

  TEST_CASE("stories260K on the GPU: prompt logits, and the reference story where its margin is clear") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    GpuModel g = load_gpu(dir, 1024);
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    const auto ids = test::read_i32(**gs, "prompt.input_ids");
    auto logits = prompt_logits(*g.runner, ids);
    REQUIRE(logits.ok());
    const double err = rel(*logits, test::read_f32(**gs, "prompt.logits"));
    MESSAGE("stories260K GPU prompt logits max|d|/max|ref| = " << err);
    CHECK(err <= 2e-2);
    // The story: margins from the exact CPU backend, teacher-forced on the GPU.
    const auto story = test::read_i32(**gs, "bos.greedy_ids");
    std::vector<int32_t> full = {1};
    full.insert(full.end(), story.begin(), story.end() - 1);
    auto gl = prompt_logits(*g.runner, full);
    REQUIRE(gl.ok());
    const std::vector<float> cl = cpu_logits(dir, full);
    const double abs_err = max_abs_diff(*gl, cl);
    const int64_t V = g.model.config.n_vocab;
    int clear = 0, agree = 0;
    for (size_t i = 0; i < story.size(); ++i) {
      std::vector<float> row(cl.begin() + i * V, cl.begin() + (i + 1) * V);
      std::vector<float> sorted = row;
      std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
      if (sorted[0] - sorted[1] < 2 * abs_err) continue;
      ++clear;
      agree += argmax(gl->data() + i * V, V) == story[i];
    }
    MESSAGE("story steps with a clear margin: " << clear << "/256, GPU agrees on " << agree);
    CHECK(clear >= 128);  // most of the story is decided by a clear margin
    CHECK(agree == clear);
  }

  TEST_CASE("CUDA graphs replay the same tokens as eager steps; batches of different lengths") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    GpuModel eager = load_gpu(dir, 4096, false);
    GpuModel graph = load_gpu(dir, 4096, true);
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    const auto a = test::read_i32(**gs, "seq0.input_ids");
    const auto b = test::read_i32(**gs, "seq1.input_ids");
    GenerateOptions go;
    go.n_predict = 16;
    go.sampling.temperature = 0;
    go.stop_at_eos = false;
    auto r1 = generate(*eager.runner, {a, b}, go);
    auto r2 = generate(*graph.runner, {a, b}, go);
    REQUIRE(r1.ok());
    REQUIRE(r2.ok());
    CHECK(r1->tokens == r2->tokens);
    CHECK(eager.ex->graphs_captured() == 0);
    CHECK(graph.ex->graphs_captured() >= 1);
    CHECK(graph.ex->graph_replays() >= 14);
    // Seeded sampling on the GPU is reproducible.
    go.sampling = SamplingParams{0.9f, 40, 0.95f, 11};
    auto s1 = generate(*graph.runner, {a, b}, go);
    auto s2 = generate(*graph.runner, {a, b}, go);
    REQUIRE(s1.ok());
    REQUIRE(s2.ok());
    CHECK(s1->tokens == s2->tokens);
    CHECK(s1->tokens != r2->tokens);
    // The first step of a two-sequence batch gives each sequence the logits it gets alone.
    StepBatch sb;
    const int32_t sa = graph.kv->add_sequence(), sbq = graph.kv->add_sequence();
    for (size_t j = 0; j < a.size(); ++j) sb.add(a[j], static_cast<int32_t>(j), sa, j + 1 == a.size());
    for (size_t j = 0; j < b.size(); ++j) sb.add(b[j], static_cast<int32_t>(j), sbq, j + 1 == b.size());
    std::vector<float> both;
    REQUIRE(graph.runner->step(sb, both).ok());
    graph.kv->free_sequence(sa);
    graph.kv->free_sequence(sbq);
    auto la = prompt_logits(*graph.runner, a);
    auto lb = prompt_logits(*graph.runner, b);
    REQUIRE(la.ok());
    REQUIRE(lb.ok());
    const int64_t V = graph.model.config.n_vocab;
    std::vector<float> last_a(la->end() - V, la->end()), last_b(lb->end() - V, lb->end());
    CHECK(rel(std::vector<float>(both.begin(), both.begin() + V), last_a) < 2e-2);
    CHECK(rel(std::vector<float>(both.begin() + V, both.end()), last_b) < 2e-2);
  }

  TEST_CASE("layers streamed from pinned host memory through the slot ring give the resident results") {
    for (const char* name : {"llama-gqa", "qwen2-bias"}) {
      const std::string dir = test::shared_dir() + "/golden/" + name;
      auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
      REQUIRE(gs.ok());
      const auto ids = test::read_i32(**gs, "seq1.input_ids");
      GpuModel all = load_gpu(dir);
      auto ref = prompt_logits(*all.runner, ids, 16);
      REQUIRE(ref.ok());
      GenerateOptions go;
      go.n_predict = 12;
      go.sampling.temperature = 0;
      go.stop_at_eos = false;
      auto ref_tok = generate(*all.runner, {ids}, go);
      REQUIRE(ref_tok.ok());
      for (int64_t resident : {0, 1, 2}) {
        CAPTURE(resident);
        GpuModel st = load_gpu(dir, 4096, true, resident);
        CHECK(st.ex->n_streamed_layers() == st.model.config.n_layers - resident);
        CHECK(st.model.weights->layer_tier(st.model.config.n_layers - 1) == Tier::kPinnedHost);
        auto l = prompt_logits(*st.runner, ids, 16);  // several steps: the ring wraps across them
        REQUIRE(l.ok());
        CHECK(*l == *ref);  // same bytes, same kernels
        auto tok = generate(*st.runner, {ids}, go);
        REQUIRE(tok.ok());
        CHECK(tok->tokens == ref_tok->tokens);
        CHECK(st.ex->streamed_bytes() > 0);
        CHECK(st.ex->graphs_captured() == 0);  // graphs only when every layer is resident
      }
      // The token embedding in pinned host memory (the plan's embedding_on_host; a tied one, as
      // qwen2-bias's, stays on the GPU with the lm_head): the same rows, the same results.
      GpuModel eh = load_gpu(dir, 4096, true, 1, "", "", false, 2, "", DType::kBF16, /*embedding_on_host=*/true);
      const bool tied = eh.model.config.tie_word_embeddings;
      CHECK(eh.model.weights->globals().t[kTokEmbd].tier == (tied ? Tier::kDevice : Tier::kPinnedHost));
      auto l = prompt_logits(*eh.runner, ids, 16);
      REQUIRE(l.ok());
      CHECK(*l == *ref);
      auto tok = generate(*eh.runner, {ids}, go);
      REQUIRE(tok.ok());
      CHECK(tok->tokens == ref_tok->tokens);
    }
  }

  TEST_CASE("layers streamed from disk (io_uring into pinned slots, then the ring) give the resident results; a bad block fails the step") {
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";  // 4 layers, BF16
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    const auto ids = test::read_i32(**gs, "seq1.input_ids");
    GpuModel all = load_gpu(dir);
    auto ref = prompt_logits(*all.runner, ids, 16);
    REQUIRE(ref.ok());
    test::TempDir tmp;
    const std::string store = tmp / "store";
    {
      auto m = load_model(dir, LoadOptions{.synthetic_layers = 0, .need_tokenizer = false});
      REQUIRE(m.ok());
      REQUIRE(pack_store(*m->weights, store).ok());
    }
    for (const char* places : {"DDDD", "RSDD", "RDSD", "DSDS"}) {
      const std::string p = places;
      CAPTURE(p);
      GpuModel d = load_gpu(dir, 4096, true, -1, places, store);
      auto l = prompt_logits(*d.runner, ids, 16);  // several steps: reads and copies wrap across them
      REQUIRE_MESSAGE(l.ok(), l.status().message());
      CHECK(*l == *ref);
    }
    // A flipped byte in layer 2's block: the step that used it fails, naming the block.
    auto m = open_store(store, all.model.config);
    REQUIRE(m.ok());
    {
      std::fstream f(store + "/weights.bin", std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(static_cast<std::streamoff>(m->blocks[3].offset + 100));
      f.put('\x7f');
    }
    GpuModel bad = load_gpu(dir, 4096, true, -1, "RRDD", store);
    auto l = prompt_logits(*bad.runner, ids, 16);
    REQUIRE(!l.ok());
    CHECK(l.status().message().find("layer.2") != std::string::npos);
    CHECK(l.status().message().find("checksum") != std::string::npos);
  }

  TEST_CASE("CPU-computed layers (residual over PCIe, host KV) match the golden logits; the budget cap holds") {
    for (const char* name : {"llama-gqa", "qwen2-bias"}) {
      const std::string dir = test::shared_dir() + "/golden/" + name;
      auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
      REQUIRE(gs.ok());
      const auto ids = test::read_i32(**gs, "seq1.input_ids");
      const auto ref_logits = test::read_f32(**gs, "seq1.logits");
      GpuModel all = load_gpu(dir);
      auto gpu_only = prompt_logits(*all.runner, ids, 16);
      REQUIRE(gpu_only.ok());
      for (const char* places : {"RCSC", "CCCC", "CSRS"}) {
        const std::string p = places;
        CAPTURE(p);
        GpuModel h = load_gpu(dir, 4096, true, -1, places);
        CHECK(h.ex->n_cpu_layers() > 0);
        auto l = prompt_logits(*h.runner, ids, 16);
        REQUIRE_MESSAGE(l.ok(), l.status().message());
        const double err = rel(*l, ref_logits);
        MESSAGE(std::string(name) << " " << std::string(places) << ": logits max|d|/max|ref| = " << err << " (all-GPU " << rel(*gpu_only, ref_logits) << ")");
        CHECK(err <= 2e-2);
        // Decode steps too (graphs are off with non-resident layers): same tokens as prompt steps say.
        GenerateOptions go;
        go.n_predict = 8;
        go.sampling.temperature = 0;
        go.stop_at_eos = false;
        auto res = generate(*h.runner, {ids}, go);
        REQUIRE(res.ok());
      }
    }
    // The cap: a budget below what the executor would allocate is refused by the device, not exceeded.
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto m = load_model(dir, LoadOptions{.synthetic_layers = 0, .need_tokenizer = false});
    REQUIRE(m.ok());
    KvCacheShape s{m->config.n_layers, m->config.n_kv_heads, m->config.head_dim, 16, 64};
    gpu::GpuOptions o;
    o.cap_bytes = 8 << 20;  // less than the cuBLAS workspace + weights
    auto ex = gpu::GpuExecutor::create(*m->weights, s, o);
    REQUIRE(!ex.ok());
    CHECK(ex.status().message().find("--gpu-mem") != std::string::npos);
    o.cap_bytes = 256 << 20;
    auto m2 = load_model(dir, LoadOptions{.synthetic_layers = 0, .need_tokenizer = false});
    REQUIRE(m2.ok());
    auto ok = gpu::GpuExecutor::create(*m2->weights, s, o);
    REQUIRE(ok.ok());
    CHECK((*ok)->peak_device_bytes() <= o.cap_bytes);
  }

  TEST_CASE("K/V in host memory, attention on the CPU (heterogeneous pipeline): golden logits, micro-batches, batches, streamed layers") {
    for (const char* name : {"llama-gqa", "llama3-tied", "qwen2-bias"}) {
      const std::string dir = test::shared_dir() + "/golden/" + name;
      auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
      REQUIRE(gs.ok());
      // A decode batch of three sequences (two of them the same prompt): each sequence's tokens as
      // when it runs alone, and every block back afterwards.
      auto batch_as_alone = [&](GpuModel& g) {
        const auto a = test::read_i32(**gs, "seq0.input_ids"), b = test::read_i32(**gs, "seq1.input_ids");
        GenerateOptions go;
        go.n_predict = 6;
        go.sampling.temperature = 0;
        go.stop_at_eos = false;
        auto together = generate(*g.runner, {a, b, a}, go);
        REQUIRE(together.ok());
        auto alone = generate(*g.runner, {b}, go);
        REQUIRE(alone.ok());
        CHECK(together->tokens[0] == together->tokens[2]);
        CHECK(together->tokens[1] == alone->tokens[0]);
        CHECK(g.kv->n_free_blocks() == g.kv->shape().n_blocks);
      };
      GpuModel ref = load_gpu(dir);
      for (const char* seq : {"seq0", "seq1"}) {
        const auto ids = test::read_i32(**gs, std::string(seq) + ".input_ids");
        const auto ref_logits = test::read_f32(**gs, std::string(seq) + ".logits");
        auto gl = prompt_logits(*ref.runner, ids, 7);
        REQUIRE(gl.ok());
        for (int mb : {1, 2}) {
          for (const char* places : {"", "RS"}) {
            GpuModel h = load_gpu(dir, 4096, true, -1, places, "", /*kv_host=*/true, mb);
            CHECK(h.ex->n_kv_host_layers() == h.model.config.n_layers);
            // Chunks of 7: the first is a fresh prompt (GPU attention over this step's K/V), later
            // ones attend on the CPU to K/V earlier steps left in host memory.
            auto l = prompt_logits(*h.runner, ids, 7);
            REQUIRE_MESSAGE(l.ok(), l.status().message());
            const double err = rel(*l, ref_logits), vs_gpu = rel(*l, *gl);
            MESSAGE(std::string(name) << " " << std::string(seq) << " host KV, " << mb << " micro-batch(es), places '" << std::string(places) << "': max|d|/max|ref| = " << err
                         << " vs golden, " << vs_gpu << " vs GPU attention (GPU attention vs golden " << rel(*gl, ref_logits) << ")");
            CHECK(err <= 2e-2);
            // The AMX kernel rounds Q and P to BF16, as the GPU's rounds its inputs: the two differ
            // by as much as each differs from the golden logits (0.005-0.015 on the H100 host).
            CHECK(vs_gpu <= 2e-2);
            auto whole = prompt_logits(*h.runner, ids, 512);  // one fresh step
            REQUIRE(whole.ok());
            CHECK(rel(*whole, ref_logits) <= 2e-2);
          }
        }
      }
      // Mixed placements (--kv split): some layers' K/V on the host, the others' on the GPU. A
      // resident GPU-K/V layer after a host-K/V one runs per micro-batch in its chain ("HGG": two
      // chained; "RS" places: a streamed GPU-K/V layer ends the chain and runs whole).
      struct Mixed {
        const char* pattern;
        const char* places;
      };
      for (const Mixed& mx : {Mixed{"HG", ""}, Mixed{"GH", ""}, Mixed{"HGG", ""}, Mixed{"HGGH", ""}, Mixed{"HGG", "RS"}}) {
        const auto ids = test::read_i32(**gs, "seq1.input_ids");
        const auto ref_logits = test::read_f32(**gs, "seq1.logits");
        GpuModel mixed = load_gpu(dir, 4096, true, -1, mx.places, "", false, 2, mx.pattern);
        CHECK(mixed.ex->n_kv_host_layers() > 0);
        CHECK(mixed.ex->n_kv_host_layers() < mixed.model.config.n_layers);
        // Chunks of 7 (later chunks split into micro-batches of one sequence), then one fresh step.
        for (int64_t chunk : {7, 512}) {
          auto l = prompt_logits(*mixed.runner, ids, chunk);
          REQUIRE_MESSAGE(l.ok(), l.status().message());
          MESSAGE(std::string(name) << " mixed K/V '" << std::string(mx.pattern) << "' places '" << std::string(mx.places) << "', chunks of " << chunk
                                    << ": max|d|/max|ref| = " << rel(*l, ref_logits));
          CHECK(rel(*l, ref_logits) <= 2e-2);
        }
        // A step with both kinds of rows: seq0's next 5 tokens over its cached K/V (two
        // micro-batches through the chain) and seq1's whole prompt (fresh: the chained layers'
        // fresh rows after the micro-batches). Each sequence's logits as the golden ones.
        {
          const auto a = test::read_i32(**gs, "seq0.input_ids"), b = test::read_i32(**gs, "seq1.input_ids");
          const auto ref_a = test::read_f32(**gs, "seq0.logits"), ref_b = test::read_f32(**gs, "seq1.logits");
          const int64_t V = mixed.model.config.n_vocab, n0 = static_cast<int64_t>(a.size()) / 2, n1 = static_cast<int64_t>(a.size()) - n0;
          REQUIRE(n1 >= 2);
          KvCache& kv = *mixed.kv;
          const int32_t sa = kv.add_sequence(), sb = kv.add_sequence();
          StepBatch st;
          std::vector<float> out;
          for (int64_t j = 0; j < n0; ++j) st.add(a[j], static_cast<int32_t>(j), sa, false);
          REQUIRE(mixed.runner->step(st, out).ok());
          st.clear();
          for (int64_t j = n0; j < n0 + n1; ++j) st.add(a[j], static_cast<int32_t>(j), sa, true);
          for (size_t j = 0; j < b.size(); ++j) st.add(b[j], static_cast<int32_t>(j), sb, true);
          auto r = mixed.runner->step(st, out);
          REQUIRE_MESSAGE(r.ok(), r.message());
          const std::vector<float> got_a(out.begin(), out.begin() + n1 * V), got_b(out.begin() + n1 * V, out.end());
          const std::vector<float> want_a(ref_a.begin() + n0 * V, ref_a.begin() + (n0 + n1) * V);
          MESSAGE(std::string(name) << " mixed K/V '" << std::string(mx.pattern) << "', cached + fresh rows in one step: " << rel(got_a, want_a) << ", "
                                    << rel(got_b, ref_b));
          CHECK(rel(got_a, want_a) <= 2e-2);
          CHECK(rel(got_b, ref_b) <= 2e-2);
          kv.free_sequence(sa);
          kv.free_sequence(sb);
        }
        // A decode batch: each micro-batch's rows go through the chained layers.
        batch_as_alone(mixed);
      }
      // A decode batch of sequences of different lengths: each token's logits as when alone.
      GpuModel h = load_gpu(dir, 4096, true, -1, "", "", true, 2);
      batch_as_alone(h);
    }
  }

  TEST_CASE("K/V on disk under the heterogeneous pipeline: the golden logits with the sequence spilled and read back between chunks") {
    for (const char* name : {"llama-gqa", "qwen2-bias"}) {
      const std::string dir = test::shared_dir() + "/golden/" + name;
      auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
      REQUIRE(gs.ok());
      const auto ids = test::read_i32(**gs, "seq1.input_ids");
      const auto ref_logits = test::read_f32(**gs, "seq1.logits");
      const int64_t n = static_cast<int64_t>(ids.size()), blocks = (n + 15) / 16;
      GpuModel plain = load_gpu(dir, 4096, true, -1, "", "", true, 2);
      auto want = prompt_logits(*plain.runner, ids, 7);
      REQUIRE(want.ok());
      // A host pool of one sequence's blocks; a second sequence takes it between the chunks.
      GpuModel h = load_gpu(dir, blocks * 16, true, -1, "", "", true, 2);
      test::TempDir tmp;
      REQUIRE(h.kv->enable_disk(tmp.path.string(), 2 * blocks).ok());
      bool spilled = false;
      auto all = test::logits_with_spills(*h.runner, ids, 7, &spilled);
      REQUIRE_MESSAGE(all.ok(), all.status().message());
      CHECK(spilled);
      CHECK(h.kv->blocks_spilled() >= blocks);
      CHECK(h.kv->blocks_restored() >= blocks);
      const double err = rel(*all, ref_logits), vs_host = rel(*all, *want);
      MESSAGE(std::string(name) << " K/V through disk: max|d|/max|ref| = " << err << " vs golden, " << vs_host << " vs host K/V without disk");
      CHECK(err <= 2e-2);
      CHECK(vs_host <= 1e-6);
    }
  }

  TEST_CASE("synthetic presets materialise on the GPU in seconds and match the host generator") {
    for (const char* preset : {"llama-2-7b", "llama-2-13b", "llama-3-8b", "mistral-7b", "qwen2.5-32b", "llama-3-70b"}) {
      auto t0 = std::chrono::steady_clock::now();
      auto m = load_model(std::string("synthetic:") + preset, LoadOptions{.synthetic_layers = 2, .need_tokenizer = false, .host_weights = false});
      REQUIRE(m.ok());
      KvCacheShape s{m->config.n_layers, m->config.n_kv_heads, m->config.head_dim, 16, 8};
      auto ex = gpu::GpuExecutor::create(*m->weights, s);
      REQUIRE_MESSAGE(ex.ok(), ex.status().message());
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      MESSAGE(std::string(preset) << " (2 layers) on the GPU in " << secs << " s, " << (*ex)->device_bytes() / 1073741824.0 << " GiB");
      // One tensor back from the device equals the host generator.
      const TensorView& wd = m->weights->layer(1)[kWDown];
      REQUIRE(wd.tier == Tier::kDevice);
      std::vector<uint16_t> got(4096), want(4096);
      CUDA_CHECK(cudaMemcpy(got.data(), wd.data, 4096 * 2, cudaMemcpyDeviceToHost));
      synthetic_fill_bf16("model.layers.1.mlp.down_proj.weight", m->config.n_ff, false, 0, 4096, want.data());
      CHECK(got == want);
    }
    // The token embedding generated on the GPU a layer buffer at a time into pinned host memory
    // (Llama-3-70B's 2.1 GB table is two such pieces): slices across it equal the host generator.
    auto m = load_model("synthetic:llama-3-70b", LoadOptions{.synthetic_layers = 2, .need_tokenizer = false, .host_weights = false});
    REQUIRE(m.ok());
    KvCacheShape s{m->config.n_layers, m->config.n_kv_heads, m->config.head_dim, 16, 8};
    gpu::GpuOptions o;
    o.n_resident_layers = 1;
    o.plan.embedding_on_host = true;
    auto ex = gpu::GpuExecutor::create(*m->weights, s, o);
    REQUIRE_MESSAGE(ex.ok(), ex.status().message());
    const TensorView& e = m->weights->globals().t[kTokEmbd];
    REQUIRE(e.tier == Tier::kPinnedHost);
    const auto info = m->weights->synthetic_info(-1, kTokEmbd);
    const int64_t n = m->config.n_vocab * m->config.n_embd;
    std::vector<uint16_t> want(65536);
    for (int64_t k = 0; k <= 8; ++k) {
      const int64_t first = std::min<int64_t>(n - 65536, k * (n / 8) - 32768 * (k > 0));
      synthetic_fill_bf16(info.name, info.fan_in, info.is_norm, static_cast<uint64_t>(first), 65536, want.data());
      CAPTURE(first);
      CHECK(std::memcmp(static_cast<const uint16_t*>(e.data) + first, want.data(), want.size() * 2) == 0);
    }
  }

  // Last: it turns the process's tracer on (which also turns CUDA graphs off for later executors).
  TEST_CASE("trace of a streamed run: copy and compute spans on their tracks, overlap measured") {
    Tracer::get().enable();
    const std::string dir = test::shared_dir() + "/golden/llama-gqa";
    auto gs = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(gs.ok());
    const auto ids = test::read_i32(**gs, "seq0.input_ids");
    const size_t before = Tracer::get().size();
    {
      GpuModel st = load_gpu(dir, 4096, true, 1);
      GenerateOptions go;
      go.n_predict = 8;
      go.sampling.temperature = 0;
      go.stop_at_eos = false;
      REQUIRE(generate(*st.runner, {ids}, go).ok());
    }
    CHECK(Tracer::get().size() > before + 8 * 4);
    const auto o = Tracer::get().overlap("gpu.copy", "gpu.compute");
    MESSAGE("copies " << o.copy_ms << " ms, compute " << o.compute_ms << " ms, hidden " << o.hidden_fraction);
    CHECK(o.copy_ms > 0);
    CHECK(o.compute_ms > 0);
    CHECK(o.hidden_fraction >= 0.0);
    CHECK(o.hidden_fraction <= 1.0);
  }

  TEST_CASE("ferry serve on the GPU executor (stepped from the server's engine thread): a request's text is generate()'s; concurrent ones finish; every block comes back") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    GpuModel g = load_gpu(dir, 4096);
    REQUIRE(g.model.tokenizer);
    const Tokenizer& tok = *g.model.tokenizer;
    const std::vector<int32_t> prompt = tok.encode("Once upon a time", true);
    GenerateOptions go;
    go.n_predict = 40;
    go.sampling.temperature = 0;
    auto ref = generate(*g.runner, {prompt}, go);
    REQUIRE(ref.ok());
    StreamDecoder d(tok, true);
    d.prime(prompt);
    std::string ref_text;
    for (int32_t t : ref->tokens[0]) ref_text += d.push(t);
    ref_text += d.flush();
    const int64_t free0 = g.kv->n_free_blocks();
    ServerOptions so;
    so.port = 0;
    so.ctx = 256;
    so.engine = EngineOptions{4, 512, false};
    Server srv(*g.runner, tok, so);
    auto port = srv.start();
    REQUIRE_MESSAGE(port.ok(), port.status().message());
    using json = nlohmann::json;
    auto post = [&](const json& body) {
      httplib::Client c("127.0.0.1", *port);
      c.set_read_timeout(120);
      auto r = c.Post("/v1/completions", body.dump(), "application/json");
      return r ? std::make_pair(r->status, json::parse(r->body, nullptr, false)) : std::make_pair(-1, json());
    };
    auto [st, r] = post({{"prompt", "Once upon a time"}, {"max_tokens", 40}, {"temperature", 0}});
    REQUIRE(st == 200);
    CHECK(r["choices"][0]["text"] == ref_text);
    std::vector<int> codes(8);
    std::vector<int64_t> counts(8);
    std::vector<std::thread> th;
    for (int i = 0; i < 8; ++i)
      th.emplace_back([&, i] {
        auto [c, j] = post({{"prompt", "The little dog " + std::to_string(i)}, {"max_tokens", 32}, {"temperature", 0.8}, {"seed", i}, {"ignore_eos", true}});
        codes[i] = c;
        counts[i] = c == 200 ? j["usage"]["completion_tokens"].get<int64_t>() : -1;
      });
    for (auto& t : th) t.join();
    for (int i = 0; i < 8; ++i) {
      CAPTURE(i);
      CHECK(codes[i] == 200);
      CHECK(counts[i] == 32);
    }
    srv.stop();
    CHECK(g.kv->n_free_blocks() == free0);
  }
}
