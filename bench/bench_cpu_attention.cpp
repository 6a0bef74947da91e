// bench_cpu_attention: times CPU decode attention (cpu/attention.h) over a BF16 host KV cache of
// real models' head layouts, for each kernel this CPU runs, and prints the K/V bandwidth reached
// next to a plain all-core read of the same number of bytes (the floor); then prefill chunks
// (compute-bound) in GFLOP/s. No timing is asserted.
// Usage: bench_cpu_attention [BATCH CONTEXT]   (default 64 sequences x 1024 tokens)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/attention.h"
#include "offload/kv_cache.h"
#include "runtime/topology.h"

using namespace ferry;

namespace {
double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
// BF16 q and out, as the GPU pipeline hands them over.
cpu::AttnArgs bf16_args(const std::vector<uint16_t>& q, std::vector<uint16_t>& out, const std::vector<int32_t>& pos,
                        const std::vector<int32_t>& seq, int64_t n_heads) {
  cpu::AttnArgs a;
  a.q = q.data();
  a.q_bf16 = true;
  a.n_tokens = static_cast<int64_t>(pos.size());
  a.positions = pos.data();
  a.seq_ids = seq.data();
  a.n_heads = n_heads;
  a.out = out.data();
  a.out_bf16 = true;
  return a;
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t batch = argc > 2 ? std::atoll(argv[1]) : 64, ctx = argc > 2 ? std::atoll(argv[2]) : 1024;
  struct Shape {
    const char* name;
    int64_t n_heads, n_kv, hd;
  };
  const Shape shapes[] = {{"llama-2 (MHA 32/32)", 32, 32, 128}, {"llama-3-8b (GQA 32/8)", 32, 8, 128}, {"llama-3-70b (GQA 64/8)", 64, 8, 128}};
  std::printf("%s; AMX usable: %s\n", topology_summary().c_str(), cpu::amx_usable() ? "yes" : "no");
  std::printf("| heads (q/kv) | batch x context | kernel | ms | K/V GB/s | plain read GB/s | ratio |\n|---|---|---|---|---|---|---|\n");
  for (const Shape& s : shapes) {
    KvCacheShape ks{1, s.n_kv, s.hd, 16, batch * ((ctx + 15) / 16), DType::kBF16};
    auto kv = KvCache::create(ks);
    if (!kv.ok()) {
      std::fprintf(stderr, "%s\n", kv.status().message().c_str());
      return 1;
    }
    std::vector<int32_t> seq(batch), pos(batch);
    std::vector<uint16_t> row(2 * s.n_kv * s.hd);
    for (size_t i = 0; i < row.size(); ++i) row[i] = f32_to_bf16(static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f);
    for (int64_t b = 0; b < batch; ++b) {
      seq[b] = kv->add_sequence();
      if (!kv->reserve(seq[b], ctx).ok()) return 1;
      for (int64_t p = 0; p < ctx; ++p) kv->append_bf16(0, seq[b], p, row.data(), row.data() + s.n_kv * s.hd);
      kv->set_length(seq[b], ctx);
      pos[b] = static_cast<int32_t>(ctx - 1);
    }
    const double bytes = static_cast<double>(batch) * ctx * 2 * s.n_kv * s.hd * 2;
    // The floor: every thread of the arena summing its share of the same bytes.
    const KvLayerView L = kv->layer_view(0);
    const int64_t words = static_cast<int64_t>(bytes / 2 / 8);  // K then V, as uint64
    double best_read = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      std::vector<uint64_t> sums(1024, 0);
      const double t0 = now_s();
      run_parallel(1024, [&](int64_t i0, int64_t i1) {
        for (int64_t c = i0; c < i1; ++c) {
          uint64_t acc = 0;
          for (const void* base : {L.k, L.v}) {
            const uint64_t* p = static_cast<const uint64_t*>(base);
            for (int64_t w = words * c / 1024; w < words * (c + 1) / 1024; ++w) acc += p[w];
          }
          sums[c] = acc;
        }
      });
      best_read = std::min(best_read, now_s() - t0);
      if (sums[7] == 42) std::printf(" ");
    }
    std::vector<uint16_t> q(batch * s.n_heads * s.hd, f32_to_bf16(0.01f)), out(batch * s.n_heads * s.hd);
    for (cpu::AttnIsa isa : {cpu::AttnIsa::kAmx, cpu::AttnIsa::kAvx512, cpu::AttnIsa::kAvx2, cpu::AttnIsa::kScalar}) {
      if (!cpu::attn_isa_supported(isa)) continue;
      const cpu::AttnArgs a = bf16_args(q, out, pos, seq, s.n_heads);
      double best = 1e30;
      for (int rep = 0; rep < (isa == cpu::AttnIsa::kScalar ? 1 : 5); ++rep) {
        const double t0 = now_s();
        cpu::paged_attention(a, 0, *kv, isa);
        best = std::min(best, now_s() - t0);
      }
      std::printf("| %s | %lld x %lld | %s | %.2f | %.1f | %.1f | %.0f%% |\n", s.name, (long long)batch, (long long)ctx, cpu::attn_isa_name(isa), best * 1e3,
                  bytes / best / 1e9, bytes / best_read / 1e9, 100 * best_read / best);
      std::fflush(stdout);
    }
  }
  // Prefill chunks: 8 sequences continue with 256 new tokens each after 512 cached ones (the chunks
  // throughput mode attends on the CPU), compute-bound: GFLOP/s (4 x head_dim per query head and key).
  std::printf("\n| prefill: heads (q/kv) | sequences x (cached + new) | kernel | ms | GFLOP/s |\n|---|---|---|---|---|\n");
  for (const Shape& s : shapes) {
    const int64_t n_seq = 8, cached = 512, fresh = 256, len = cached + fresh;
    KvCacheShape ks{1, s.n_kv, s.hd, 16, n_seq * (len / 16), DType::kBF16};
    auto kv = KvCache::create(ks);
    if (!kv.ok()) return 1;
    std::vector<uint16_t> row(2 * s.n_kv * s.hd);
    for (size_t i = 0; i < row.size(); ++i) row[i] = f32_to_bf16(static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f);
    std::vector<int32_t> seq, pos;
    double flops = 0;
    for (int64_t b = 0; b < n_seq; ++b) {
      const int32_t q = kv->add_sequence();
      if (!kv->reserve(q, len).ok()) return 1;
      for (int64_t p = 0; p < len; ++p) kv->append_bf16(0, q, p, row.data(), row.data() + s.n_kv * s.hd);
      kv->set_length(q, len);
      for (int64_t p = cached; p < len; ++p) {
        seq.push_back(q);
        pos.push_back(static_cast<int32_t>(p));
        flops += 4.0 * static_cast<double>(s.hd) * static_cast<double>(s.n_heads) * static_cast<double>(p + 1);
      }
    }
    const int64_t T = static_cast<int64_t>(seq.size());
    std::vector<uint16_t> q(T * s.n_heads * s.hd, f32_to_bf16(0.01f)), out(T * s.n_heads * s.hd);
    for (cpu::AttnIsa isa : {cpu::AttnIsa::kAmx, cpu::AttnIsa::kAvx512, cpu::AttnIsa::kAvx2}) {
      if (!cpu::attn_isa_supported(isa)) continue;
      const cpu::AttnArgs a = bf16_args(q, out, pos, seq, s.n_heads);
      double best = 1e30;
      for (int rep = 0; rep < 3; ++rep) {
        const double t0 = now_s();
        cpu::paged_attention(a, 0, *kv, isa);
        best = std::min(best, now_s() - t0);
      }
      std::printf("| %s | %lld x (%lld + %lld) | %s | %.2f | %.0f |\n", s.name, (long long)n_seq, (long long)cached, (long long)fresh,
                  cpu::attn_isa_name(isa), best * 1e3, flops / best / 1e9);
      std::fflush(stdout);
    }
  }
  return 0;
}
