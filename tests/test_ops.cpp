// Every CPU op against a plain scalar reference (double accumulation) on fresh random inputs at
// several shapes, ggml test-backend-ops style. The GPU executor's ops join this table later.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "cpu/gemm.h"
#include "cpu/ops.h"
#include "cpu/simd.h"
#include "models/config.h"
#include "runtime/sampler.h"

using namespace ferry;

namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 r(12345);
  return r;
}

std::vector<float> randn(size_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

// Weights stored as `dtype`, and their exact float values.
struct Weights {
  std::vector<uint8_t> bytes;
  std::vector<float> values;
  TensorView view;
};
Weights make_weights(int64_t n, int64_t k, DType dtype) {
  Weights w;
  std::vector<float> v = randn(n * k, 0.5f);
  w.bytes.resize(n * k * dtype_size(dtype));
  w.values.resize(n * k);
  for (int64_t i = 0; i < n * k; ++i) {
    if (dtype == DType::kBF16) {
      uint16_t h = f32_to_bf16(v[i]);
      std::memcpy(w.bytes.data() + 2 * i, &h, 2);
      w.values[i] = bf16_to_f32(h);
    } else if (dtype == DType::kF16) {
      uint16_t h = f32_to_f16(v[i]);
      std::memcpy(w.bytes.data() + 2 * i, &h, 2);
      w.values[i] = f16_to_f32(h);
    } else {
      std::memcpy(w.bytes.data() + 4 * i, &v[i], 4);
      w.values[i] = v[i];
    }
  }
  w.view = TensorView::contiguous(w.bytes.data(), dtype, {n, k});
  return w;
}

double max_rel(const std::vector<float>& a, const std::vector<double>& ref) {
  double d = 0, m = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    REQUIRE(std::isfinite(a[i]));
    d = std::max(d, std::fabs(a[i] - ref[i]));
    m = std::max(m, std::fabs(ref[i]));
  }
  return d / m;
}

}  // namespace

TEST_SUITE("ops") {
  TEST_CASE("f16 and bf16 conversions round to nearest even and keep specials") {
    CHECK(bf16_to_f32(f32_to_bf16(1.0f)) == 1.0f);
    CHECK(f32_to_bf16(1.00390625f) == 0x3f80);   // halfway, rounds to even
    CHECK(f32_to_bf16(1.01171875f) == 0x3f82);   // halfway, rounds to even (up)
    CHECK(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
    CHECK(f16_to_f32(f32_to_f16(65504.0f)) == 65504.0f);
    CHECK(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
    CHECK(f16_to_f32(f32_to_f16(5.96046448e-8f)) == 5.96046448e-8f);  // smallest subnormal
    for (float x : {0.1f, -3.14159f, 1234.5f, 2e-4f}) CHECK(std::fabs(f16_to_f32(f32_to_f16(x)) - x) <= std::fabs(x) * 1e-3f);
  }

  TEST_CASE("gemm x W^T, both paths, F32/F16/BF16 weights, against a double reference") {
    MESSAGE("simd level: " << std::string(cpu::simd_level()));
    for (DType dt : {DType::kF32, DType::kF16, DType::kBF16}) {
      struct MNK {
        int64_t m, n, k;
      };
      for (auto [m, n, k] : std::vector<MNK>{{1, 37, 64}, {3, 128, 100}, {16, 64, 257}, {17, 96, 64}, {70, 130, 96}}) {
        CAPTURE(dtype_name(dt));
        CAPTURE(m);
        CAPTURE(n);
        CAPTURE(k);
        Weights w = make_weights(n, k, dt);
        std::vector<float> x = randn(m * k);
        std::vector<double> ref(m * n);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            double s = 0;
            for (int64_t l = 0; l < k; ++l) s += static_cast<double>(x[i * k + l]) * w.values[j * k + l];
            ref[i * n + j] = s;
          }
        std::vector<float> y(m * n, NAN), y2(m * n, NAN), y3(m * n, NAN);
        cpu::gemm_xwt(x.data(), m, w.view, y.data());
        cpu::gemm_xwt_stream(x.data(), m, w.view, y2.data());
        cpu::gemm_xwt_onednn(x.data(), m, w.view, y3.data());
        CHECK(max_rel(y, ref) < 1e-5);
        CHECK(max_rel(y2, ref) < 1e-5);
        CHECK(max_rel(y3, ref) < 1e-5);
        // With a bias.
        std::vector<float> bias = randn(n);
        TensorView bv = TensorView::contiguous(bias.data(), DType::kF32, {int64_t{n}});
        cpu::gemm_xwt(x.data(), m, w.view, y.data(), bv);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) ref[i * n + j] += bias[j];
        CHECK(max_rel(y, ref) < 1e-5);
      }
    }
  }

  TEST_CASE("rmsnorm, swiglu, embedding") {
    for (int64_t e : {1, 7, 64, 4096}) {
      const int64_t rows = 5;
      std::vector<float> x = randn(rows * e), out(rows * e);
      Weights w = make_weights(1, e, DType::kBF16);
      TensorView wv = TensorView::contiguous(w.bytes.data(), DType::kBF16, {e});
      cpu::rmsnorm(x.data(), wv, 1e-5, rows, e, out.data());
      std::vector<double> ref(rows * e);
      for (int64_t r = 0; r < rows; ++r) {
        double ss = 0;
        for (int64_t i = 0; i < e; ++i) ss += static_cast<double>(x[r * e + i]) * x[r * e + i];
        const double inv = 1.0 / std::sqrt(ss / e + 1e-5);
        for (int64_t i = 0; i < e; ++i) ref[r * e + i] = x[r * e + i] * inv * w.values[i];
      }
      CHECK(max_rel(out, ref) < 1e-5);
    }
    std::vector<float> g = randn(1000, 3.0f), u = randn(1000), o(1000);
    cpu::swiglu(g.data(), u.data(), 1000, o.data());
    std::vector<double> ref(1000);
    for (int i = 0; i < 1000; ++i) ref[i] = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
    CHECK(max_rel(o, ref) < 1e-5);

    Weights table = make_weights(50, 16, DType::kF16);
    const int32_t ids[] = {0, 49, 7, 7};
    std::vector<float> emb(4 * 16);
    cpu::embedding(table.view, ids, 4, emb.data());
    for (int t = 0; t < 4; ++t)
      for (int i = 0; i < 16; ++i) CHECK(emb[t * 16 + i] == table.values[ids[t] * 16 + i]);
  }

  TEST_CASE("rope: rotate-half pairs by position x inv_freq, and the llama3 / linear frequency rules") {
    const int64_t T = 3, H = 2, hd = 8;
    std::vector<float> x = randn(T * H * hd), orig = x;
    const int32_t pos[] = {0, 5, 1000};
    ModelConfig c;
    c.head_dim = hd;
    c.rope_theta = 10000;
    c.dtype = DType::kF32;
    std::vector<float> inv = rope_inv_freq(c);
    cpu::rope(x.data(), T, H, hd, pos, inv.data());
    std::vector<double> ref(T * H * hd);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < hd / 2; ++i) {
          const double ang = pos[t] * std::pow(10000.0, -2.0 * i / hd);
          const double a = orig[(t * H + h) * hd + i], b = orig[(t * H + h) * hd + i + hd / 2];
          ref[(t * H + h) * hd + i] = a * std::cos(ang) - b * std::sin(ang);
          ref[(t * H + h) * hd + i + hd / 2] = b * std::cos(ang) + a * std::sin(ang);
        }
    CHECK(max_rel(x, ref) < 1e-4);

    c.rope_scaling.type = RopeType::kLinear;
    c.rope_scaling.factor = 4;
    std::vector<float> lin = rope_inv_freq(c);
    for (int64_t i = 0; i < hd / 2; ++i) CHECK(lin[i] == doctest::Approx(inv[i] / 4).epsilon(1e-6));
    // llama3: high frequencies kept, low frequencies divided by the factor, a smooth band between.
    c.head_dim = 128;
    c.rope_theta = 500000;
    c.rope_scaling = {RopeType::kLlama3, 8.0, 1.0, 4.0, 8192};
    std::vector<float> l3 = rope_inv_freq(c);
    c.rope_scaling = {};
    std::vector<float> plain = rope_inv_freq(c);
    CHECK(l3[0] == plain[0]);
    CHECK(l3[63] == doctest::Approx(plain[63] / 8).epsilon(1e-6));
    bool smoothed = false;
    for (int i = 0; i < 64; ++i) smoothed |= l3[i] < plain[i] && l3[i] > plain[i] / 8 * 1.0001f;
    CHECK(smoothed);
    // BF16 checkpoints: frequencies rounded to bf16, as transformers' buffer is.
    c.dtype = DType::kBF16;
    std::vector<float> rounded = rope_inv_freq(c);
    for (int i = 0; i < 64; ++i) CHECK(rounded[i] == bf16_to_f32(f32_to_bf16(plain[i])));
  }

  TEST_CASE("attention over paged KV: GQA ratios 1/2/4/8, windows, partly filled blocks") {
    for (int64_t group : {1, 2, 4, 8}) {
      for (int64_t window : {0, 5}) {
        const int64_t n_kv = 2, hd = 16, H = n_kv * group, bs = 4;
        const std::vector<int64_t> lens = {1, 6, 13};  // partly filled last blocks
        KvCacheShape shape{1, n_kv, hd, bs, 16};
        auto kvr = KvCache::create(shape);
        REQUIRE(kvr.ok());
        KvCache& kv = *kvr;
        std::vector<int32_t> seqs;
        std::vector<std::vector<float>> K, V;
        for (int64_t L : lens) {
          const int32_t s = kv.add_sequence();
          seqs.push_back(s);
          REQUIRE(kv.reserve(s, L).ok());
          K.push_back(randn(L * n_kv * hd));
          V.push_back(randn(L * n_kv * hd));
          for (int64_t p = 0; p < L; ++p) kv.append(0, s, p, K.back().data() + p * n_kv * hd, V.back().data() + p * n_kv * hd);
          kv.set_length(s, L);
        }
        // One query token per sequence at its last position, plus an earlier one of the longest.
        std::vector<int32_t> pos = {0, 5, 12, 7}, sid = {seqs[0], seqs[1], seqs[2], seqs[2]};
        const int64_t T = 4;
        std::vector<float> q = randn(T * H * hd), out(T * H * hd, NAN);
        cpu::attention(q.data(), T, pos.data(), sid.data(), H, window, 0, kv, out.data());
        std::vector<double> ref(T * H * hd);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t si = t == 3 ? 2 : t;
          const int64_t first = window > 0 ? std::max<int64_t>(0, pos[t] - window + 1) : 0;
          for (int64_t h = 0; h < H; ++h) {
            const int64_t kh = h / group;
            std::vector<double> sc;
            double mx = -1e300;
            for (int64_t j = first; j <= pos[t]; ++j) {
              double s = 0;
              for (int64_t i = 0; i < hd; ++i) s += static_cast<double>(q[(t * H + h) * hd + i]) * K[si][(j * n_kv + kh) * hd + i];
              sc.push_back(s / std::sqrt(static_cast<double>(hd)));
              mx = std::max(mx, sc.back());
            }
            double sum = 0;
            for (double& s : sc) sum += (s = std::exp(s - mx));
            for (int64_t i = 0; i < hd; ++i) {
              double acc = 0;
              for (int64_t j = first; j <= pos[t]; ++j) acc += sc[j - first] / sum * V[si][(j * n_kv + kh) * hd + i];
              ref[(t * H + h) * hd + i] = acc;
            }
          }
        }
        CAPTURE(group);
        CAPTURE(window);
        CHECK(max_rel(out, ref) < 1e-5);
      }
    }
  }

  TEST_CASE("sampler: greedy, top-k 1, seeds, ranges") {
    std::vector<float> logits = {0.1f, 2.0f, 1.9f, -1.0f};
    CHECK(argmax(logits.data(), 4) == 1);
    SamplingParams p;
    p.temperature = 0;
    CHECK(Sampler(p).sample(logits.data(), 4) == 1);
    p.temperature = 1.0f;
    p.top_k = 1;
    CHECK(Sampler(p).sample(logits.data(), 4) == 1);
    p.top_k = 0;
    p.top_p = 1.0f;
    p.seed = 9;
    Sampler a(p), b(p);
    int counts[4] = {};
    for (int i = 0; i < 2000; ++i) {
      const int32_t x = a.sample(logits.data(), 4);
      CHECK(x == b.sample(logits.data(), 4));
      ++counts[x];
    }
    CHECK(counts[1] > counts[0]);
    CHECK(counts[2] > counts[3]);
    CHECK(counts[3] > 0);
    p.top_p = 0.5f;  // p(1) = 0.475 < 0.5, so the nucleus is {1, 2}
    Sampler c(p);
    for (int i = 0; i < 200; ++i) {
      const int32_t x = c.sample(logits.data(), 4);
      CHECK((x == 1 || x == 2));
    }
    CHECK(!SamplingParams{-1.0f, 40, 0.9f, 0}.validate().ok());
    CHECK(!SamplingParams{1.0f, -3, 0.9f, 0}.validate().ok());
    CHECK(!SamplingParams{1.0f, 40, 0.0f, 0}.validate().ok());
    CHECK(!SamplingParams{1.0f, 40, 1.5f, 0}.validate().ok());
  }
}
