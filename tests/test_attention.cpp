// CPU attention kernels (cpu/attention.h) against a double-precision reference on random inputs:
// every kernel this CPU runs, F32 and BF16 pools, GQA ratios 1/2/4/8, lengths 1 to 8k with partly
// filled blocks, sliding windows, and the key-range splits long sequences take.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "cpu/attention.h"
#include "offload/kv_cache.h"

using namespace ferry;

namespace {

std::vector<float> rand_vec(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

struct Case {
  int64_t group, head_dim, block_size;
  DType dtype;
  std::vector<int64_t> lengths;
  int64_t window;
  bool prefill = false;  // query rows: each sequence's last 12 positions (a prefill chunk)
};

// Runs one case on `isa` and returns the largest |out - ref|.
double run_case(const Case& c, cpu::AttnIsa isa, bool bf16_io) {
  std::mt19937 rng(static_cast<uint32_t>(c.group * 131 + c.head_dim * 7 + c.block_size + c.lengths.back() + c.window));
  const int64_t n_kv = 2, hd = c.head_dim, H = n_kv * c.group, bs = c.block_size;
  int64_t blocks = 0;
  for (int64_t L : c.lengths) blocks += (L + bs - 1) / bs;
  KvCacheShape shape{1, n_kv, hd, bs, blocks + 3, c.dtype};
  auto kvr = KvCache::create(shape);
  REQUIRE(kvr.ok());
  KvCache& kv = *kvr;
  std::vector<int32_t> seqs;
  std::vector<std::vector<float>> K, V;  // as stored (read back: BF16-rounded when the pool is BF16)
  for (int64_t L : c.lengths) {
    const int32_t s = kv.add_sequence();
    seqs.push_back(s);
    REQUIRE(kv.reserve(s, L).ok());
    std::vector<float> k = rand_vec(rng, L * n_kv * hd), v = rand_vec(rng, L * n_kv * hd);
    for (int64_t p = 0; p < L; ++p) {
      kv.append(0, s, p, k.data() + p * n_kv * hd, v.data() + p * n_kv * hd);
      kv.read(0, s, p, k.data() + p * n_kv * hd, v.data() + p * n_kv * hd);
    }
    kv.set_length(s, L);
    K.push_back(std::move(k));
    V.push_back(std::move(v));
  }
  // Queries: each sequence at its last position, plus up to three earlier positions (prefill rows).
  std::vector<int32_t> pos, sid, which;
  for (size_t i = 0; i < c.lengths.size(); ++i) {
    const int64_t L = c.lengths[i];
    if (c.prefill) {
      for (int64_t p = std::max<int64_t>(0, L - 12); p < L; ++p) {
        pos.push_back(static_cast<int32_t>(p));
        sid.push_back(seqs[i]);
        which.push_back(static_cast<int32_t>(i));
      }
      continue;
    }
    for (int64_t p : {L - 1, L / 2, L / 3, int64_t{0}}) {
      if (p < 0 || (p != L - 1 && std::find(pos.end() - std::min<size_t>(pos.size(), 3), pos.end(), p) != pos.end())) continue;
      pos.push_back(static_cast<int32_t>(p));
      sid.push_back(seqs[i]);
      which.push_back(static_cast<int32_t>(i));
    }
  }
  const int64_t T = static_cast<int64_t>(pos.size());
  std::vector<float> q = rand_vec(rng, T * H * hd);
  std::vector<uint16_t> qb(q.size());
  if (bf16_io)
    for (size_t i = 0; i < q.size(); ++i) q[i] = bf16_to_f32(qb[i] = f32_to_bf16(q[i]));
  std::vector<float> out(T * H * hd, NAN);
  std::vector<uint16_t> outb(T * H * hd);
  cpu::AttnArgs a;
  a.q = bf16_io ? static_cast<const void*>(qb.data()) : q.data();
  a.q_bf16 = bf16_io;
  a.n_tokens = T;
  a.positions = pos.data();
  a.seq_ids = sid.data();
  a.n_heads = H;
  a.window = c.window;
  a.out = bf16_io ? static_cast<void*>(outb.data()) : out.data();
  a.out_bf16 = bf16_io;
  cpu::paged_attention(a, 0, kv, isa);
  if (bf16_io)
    for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_f32(outb[i]);
  double worst = 0;
  for (int64_t t = 0; t < T; ++t) {
    const auto& Ks = K[which[t]];
    const auto& Vs = V[which[t]];
    const int64_t first = c.window > 0 ? std::max<int64_t>(0, pos[t] - c.window + 1) : 0;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / c.group;
      std::vector<double> sc;
      double mx = -1e300;
      for (int64_t j = first; j <= pos[t]; ++j) {
        double s = 0;
        for (int64_t i = 0; i < hd; ++i) s += static_cast<double>(q[(t * H + h) * hd + i]) * Ks[(j * n_kv + kh) * hd + i];
        sc.push_back(s / std::sqrt(static_cast<double>(hd)));
        mx = std::max(mx, sc.back());
      }
      double sum = 0;
      for (double& s : sc) sum += (s = std::exp(s - mx));
      for (int64_t i = 0; i < hd; ++i) {
        double acc = 0;
        for (size_t j = 0; j < sc.size(); ++j) acc += sc[j] * Vs[((first + static_cast<int64_t>(j)) * n_kv + kh) * hd + i];
        const double ref = acc / sum, got = out[(t * H + h) * hd + i];
        worst = std::max(worst, std::fabs(got - ref) / (bf16_io ? std::max(1.0, std::fabs(ref)) : 1.0));
        if (std::isnan(got)) return INFINITY;
      }
    }
  }
  return worst;
}

}  // namespace

TEST_SUITE("attention") {
  TEST_CASE("every kernel this CPU runs matches the reference") {
    std::vector<cpu::AttnIsa> isas;
    for (cpu::AttnIsa i : {cpu::AttnIsa::kScalar, cpu::AttnIsa::kAvx2, cpu::AttnIsa::kAvx512})
      if (cpu::attn_isa_supported(i)) isas.push_back(i);
    MESSAGE("kernels tested here: " << isas.size() << " (best " << std::string(cpu::attn_isa_name(cpu::attn_isa_best())) << "), AMX usable: "
                                    << std::string(cpu::amx_usable() ? "yes" : "no"));
    for (cpu::AttnIsa isa : isas) {
      for (int64_t group : {1, 2, 4, 8}) {
        for (DType dt : {DType::kBF16, DType::kF32}) {
          for (int64_t hd : {64, 128}) {
            for (int64_t bs : {16, 32}) {
              for (int64_t window : {0, 37}) {
                Case c{group, hd, bs, dt, {1, 7, 16, 33, 300}, window};
                CAPTURE(cpu::attn_isa_name(isa));
                CAPTURE(group);
                CAPTURE(hd);
                CAPTURE(bs);
                CAPTURE(window);
                CAPTURE(dtype_name(dt));
                CHECK(run_case(c, isa, false) < 2e-5);
              }
            }
          }
        }
      }
      // Long sequences (split into key chunks across threads), BF16 q/out as the GPU hands them.
      for (int64_t group : {1, 4, 8}) {
        Case c{group, 128, 16, DType::kBF16, {8192, 2049}, 0};
        CAPTURE(cpu::attn_isa_name(isa));
        CAPTURE(group);
        CHECK(run_case(c, isa, false) < 2e-5);
        CHECK(run_case(c, isa, true) < 1e-2);  // the output rounded to BF16
      }
    }
  }

  TEST_CASE("the tile kernel (AMX here if the CPU has it, else its arithmetic in scalar code) matches the reference to BF16 accuracy") {
    MESSAGE("tile kernel on " << std::string(cpu::amx_usable() ? "AMX" : "scalar emulation (no AMX here)"));
    int64_t cases = 0;
    for (int64_t group : {1, 2, 4, 8}) {
      for (int64_t hd : {64, 128}) {
        for (int64_t bs : {16, 32}) {
          for (int64_t window : {0, 37}) {
            for (bool prefill : {false, true}) {
              Case c{group, hd, bs, DType::kBF16, {1, 7, 16, 33, 300}, window, prefill};
              CAPTURE(group);
              CAPTURE(hd);
              CAPTURE(bs);
              CAPTURE(window);
              CAPTURE(prefill);
              // Q and P enter the tiles as BF16: about 2^-9 of each weight.
              CHECK(run_case(c, cpu::AttnIsa::kAmx, false) < 2e-2);
              ++cases;
            }
          }
        }
      }
    }
    // Long sequences: key chunks split across threads and merged, decode and prefill rows.
    for (int64_t group : {1, 4, 8})
      for (bool prefill : {false, true}) {
        Case c{group, 128, 16, DType::kBF16, {4096, 2049}, 0, prefill};
        CAPTURE(group);
        CAPTURE(prefill);
        CHECK(run_case(c, cpu::AttnIsa::kAmx, true) < 2e-2);
      }
    // F32 pools and odd shapes fall back to the other kernels: exact again.
    CHECK(run_case(Case{4, 64, 16, DType::kF32, {1, 40}, 0, true}, cpu::AttnIsa::kAmx, false) < 2e-5);
    CHECK(run_case(Case{4, 48, 16, DType::kBF16, {1, 40}, 0, true}, cpu::AttnIsa::kAmx, false) < 2e-5);
    CHECK(cases == 64);
  }

  TEST_CASE("every prefetch variant leaves the results as they were") {
    const cpu::AttnPrefetch saved = cpu::attn_prefetch();
    const cpu::AttnIsa vec = cpu::attn_isa_supported(cpu::AttnIsa::kAvx512) ? cpu::AttnIsa::kAvx512
                             : cpu::attn_isa_supported(cpu::AttnIsa::kAvx2)  ? cpu::AttnIsa::kAvx2
                                                                             : cpu::AttnIsa::kScalar;
    for (cpu::AttnPrefetch p : {cpu::AttnPrefetch{0, false}, cpu::AttnPrefetch{1, false}, cpu::AttnPrefetch{1, true}, cpu::AttnPrefetch{3, false},
                                cpu::AttnPrefetch{3, true}}) {
      cpu::set_attn_prefetch(p);
      CHECK(cpu::attn_prefetch().blocks == p.blocks);
      CAPTURE(p.blocks);
      CAPTURE(p.spread);
      for (int64_t bs : {16, 32}) {
        CAPTURE(bs);
        CHECK(run_case(Case{4, 128, bs, DType::kBF16, {1, 17, 300}, 0, false}, cpu::AttnIsa::kAmx, false) < 2e-2);
        CHECK(run_case(Case{4, 128, bs, DType::kBF16, {1, 17, 300}, 0, false}, vec, false) < 2e-5);
        // The vector kernels spread only over whole blocks: MHA and a group of 2, a window (a
        // partly used first block) and blocks of 64 keys (wider than two vectors).
        CHECK(run_case(Case{1, 128, bs, DType::kBF16, {1, 33, 300}, 0, false}, vec, false) < 2e-5);
        CHECK(run_case(Case{2, 64, bs, DType::kBF16, {5, 200}, 37, false}, vec, false) < 2e-5);
      }
      CHECK(run_case(Case{1, 128, 64, DType::kBF16, {70, 300}, 0, false}, vec, false) < 2e-5);
    }
    cpu::set_attn_prefetch(saved);
  }

  TEST_CASE("KV cache round trip in both dtypes and layouts") {
    for (DType dt : {DType::kF32, DType::kBF16}) {
      KvCacheShape s{2, 3, 8, 4, 5, dt};
      auto kv = KvCache::create(s);
      REQUIRE(kv.ok());
      const int32_t q = kv->add_sequence();
      REQUIRE(kv->reserve(q, 13).ok());
      std::mt19937 rng(3);
      std::vector<std::vector<float>> ks, vs;
      for (int64_t p = 0; p < 13; ++p) {
        ks.push_back(rand_vec(rng, 24));
        vs.push_back(rand_vec(rng, 24));
        kv->append(1, q, p, ks.back().data(), vs.back().data());
      }
      for (int64_t p = 0; p < 13; ++p) {
        std::vector<float> k(24), v(24);
        kv->read(1, q, p, k.data(), v.data());
        for (int i = 0; i < 24; ++i) {
          const float ek = dt == DType::kF32 ? ks[p][i] : bf16_to_f32(f32_to_bf16(ks[p][i]));
          const float ev = dt == DType::kF32 ? vs[p][i] : bf16_to_f32(f32_to_bf16(vs[p][i]));
          CHECK(k[i] == ek);
          CHECK(v[i] == ev);
        }
      }
      CHECK(!kv->reserve(q, 21).ok());  // 6 blocks of 4 > 5
    }
    CHECK(!KvCache::create({1, 1, 7, 16, 4}).ok());  // odd head_dim
  }
}
