// bench_cpu_attention: times CPU decode attention (cpu/attention.h) over a BF16 host KV cache of
// real models' head layouts, for each kernel this CPU runs, and prints the K/V bandwidth reached
// next to a plain all-core read of the same number of bytes (the floor); then prefill chunks
// (compute-bound) in GFLOP/s. No timing is asserted.
// Usage: bench_cpu_attention [BATCH CONTEXT [LAYERS HEADS KV_HEADS [PARTS]]]
//   (default 64 sequences x 1024 tokens). With LAYERS, only this table instead: decode attention the way the
//   GPU pipeline calls it: a pool of LAYERS layers, every layer in turn, the batch in PARTS (default
//   2) calls per layer, the best kernel; with a GPU, also while its copy engine reads pinned host
//   memory, back to back and paced. FERRY_KV_HUGEPAGES=0 / FERRY_ATTN_PREFETCH=0 turn off the pools'
//   huge pages / the kernels' software prefetch, to measure each (FERRY_ATTN_PREFETCH=N: N blocks
//   ahead, FERRY_ATTN_PREFETCH_SPREAD=0: all at each block's start in every kernel); the
//   pipeline table also times the other prefetch variants on the same pool, interleaved, and the
//   calls as the pipeline makes them (from another thread, with gaps); FERRY_BENCH_BLOCKS=churn
//   hands out the blocks as a pool that has served other sequences does.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cpu/attention.h"
#include "gpu/device.h"
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

// Decode attention over a pool of n_layers layers, layer after layer and `parts` calls per layer, as
// the GPU pipeline runs it (each sequence's blocks reserved for 64 more tokens, as admission does).
void pipeline_table(int64_t batch, int64_t ctx, int64_t n_layers, int64_t n_heads, int64_t n_kv, int64_t parts) {
  const int64_t hd = 128, bs = 16, blocks_per_seq = (ctx + 64 + bs - 1) / bs;
  KvCacheShape ks{n_layers, n_kv, hd, bs, batch * blocks_per_seq, DType::kBF16};
  auto kv = KvCache::create(ks);
  if (!kv.ok()) {
    std::fprintf(stderr, "%s\n", kv.status().message().c_str());
    return;
  }
  std::vector<int32_t> seq(batch), pos(batch);
  std::vector<uint16_t> row(2 * n_kv * hd);
  for (size_t i = 0; i < row.size(); ++i) row[i] = f32_to_bf16(static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f);
  // FERRY_BENCH_BLOCKS=churn: every sequence's blocks as a served pool hands them out once others
  // have finished (freed in order, then taken from the free stack: a finished sequence's blocks in
  // descending order).
  const char* layout = std::getenv("FERRY_BENCH_BLOCKS");
  const bool churn = layout && std::string(layout) == "churn";
  if (churn) {
    for (int64_t b = 0; b < batch; ++b) {
      seq[b] = kv->add_sequence();
      if (!kv->reserve(seq[b], ctx + 64).ok()) return;
    }
    for (int64_t b = 0; b < batch; ++b) kv->free_sequence(seq[b]);
  }
  for (int64_t b = 0; b < batch; ++b) {
    seq[b] = kv->add_sequence();
    if (!kv->reserve(seq[b], ctx + 64).ok()) return;
    for (int64_t il = 0; il < n_layers; ++il)
      for (int64_t p = 0; p < ctx; ++p) kv->append_bf16(il, seq[b], p, row.data(), row.data() + n_kv * hd);
    kv->set_length(seq[b], ctx);
    pos[b] = static_cast<int32_t>(ctx - 1);
  }
  std::vector<uint16_t> q(batch * n_heads * hd, f32_to_bf16(0.01f)), out(batch * n_heads * hd);
  const double bytes = static_cast<double>(n_layers) * batch * ctx * 2 * n_kv * hd * 2;
  const cpu::AttnIsa isa = cpu::attn_isa_best();
  // Returns the seconds spent in the calls; gap_us > 0 sleeps that long before each call (the
  // pipeline's calls wait for the GPU's QKV, and the workers may leave the arena meanwhile).
  auto attend_all = [&](int gap_us = 0) {
    double in_calls = 0;
    for (int64_t il = 0; il < n_layers; ++il)
      for (int64_t p = 0; p < parts; ++p) {
        if (gap_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
        const double c0 = now_s();
        const int64_t b0 = batch * p / parts, b1 = batch * (p + 1) / parts;
        cpu::AttnArgs a;
        a.q = q.data() + b0 * n_heads * hd;
        a.q_bf16 = true;
        a.n_tokens = b1 - b0;
        a.positions = pos.data() + b0;
        a.seq_ids = seq.data() + b0;
        a.n_heads = n_heads;
        a.out = out.data() + b0 * n_heads * hd;
        a.out_bf16 = true;
        cpu::paged_attention(a, il, *kv, isa);
        in_calls += now_s() - c0;
      }
    return in_calls;
  };
  // Prefetch variants, interleaved over the same pool in this process (processes differ by more than
  // the variants do): the default (the environment's) first.
  std::vector<cpu::AttnPrefetch> variants = {cpu::attn_prefetch()};
  for (cpu::AttnPrefetch v : {cpu::AttnPrefetch{0, false}, cpu::AttnPrefetch{1, false}, cpu::AttnPrefetch{1, true}, cpu::AttnPrefetch{2, false},
                              cpu::AttnPrefetch{2, true}})
    if (v.blocks != variants[0].blocks || v.spread != variants[0].spread) variants.push_back(v);
  std::vector<double> best_of(variants.size(), 1e30);
  for (int rep = 0; rep < 4; ++rep)
    for (size_t vi = 0; vi < variants.size(); ++vi) {
      cpu::set_attn_prefetch(variants[vi]);
      const double t0 = now_s();
      attend_all();
      best_of[vi] = std::min(best_of[vi], now_s() - t0);
    }
  cpu::set_attn_prefetch(variants[0]);
  // How the pipeline calls it: from another thread (the CUDA host-function thread), and with gaps
  // between the calls; interleaved, best of three each.
  struct Pattern {
    const char* name;
    bool other_thread;
    int gap_us;
  };
  const Pattern patterns[] = {{"main thread, back to back", false, 0},
                              {"another thread, back to back", true, 0},
                              {"main thread, 1 ms before each call", false, 1000},
                              {"another thread, 1 ms before each call", true, 1000}};
  double best_pattern[4] = {1e30, 1e30, 1e30, 1e30};
  for (int rep = 0; rep < 3; ++rep)
    for (int pi = 0; pi < 4; ++pi) {
      double t = 0;
      if (patterns[pi].other_thread) std::thread([&] { t = attend_all(patterns[pi].gap_us); }).join();
      else t = attend_all(patterns[pi].gap_us);
      best_pattern[pi] = std::min(best_pattern[pi], t);
    }
  const double best = best_of[0];
  // The same attention while the GPU's copy engine reads pinned host memory (the streamed weights'
  // copies in the pipeline): back to back, then paced at a few average rates.
  struct Beside {
    double pace, copy_gbs, kv_gbs;
  };
  std::vector<Beside> beside;
  for (double pace : {0.0, 40.0, 30.0, 20.0, 10.0}) {
    const gpu::SharedCopyRate r = gpu::h2d_during([&] {
      for (int rep = 0; rep < 2; ++rep) attend_all();
    }, pace);
    if (!r.error.empty()) break;  // no GPU: the table is left out
    beside.push_back({pace, r.h2d_gbs, 2 * bytes / r.host_seconds / 1e9});
  }
  // Two reads of the same bytes, to tell the kernel's cost from the memory's: every thread summing the
  // pools front to back ("plain"), and the K and V tiles the kernel reads, in its order ("tiles").
  const int64_t tile_words = bs * hd * 2 / 8;
  double best_plain = 1e30, best_tiles = 1e30;
  std::vector<uint64_t> sums(1024 * 8, 0);
  for (int rep = 0; rep < 3; ++rep) {
    double t0 = now_s();
    for (int64_t il = 0; il < n_layers; ++il) {
      const KvLayerView L = kv->layer_view(il);
      const int64_t words = batch * blocks_per_seq * L.block_elems() * 2 / 8;
      run_parallel(1024, [&](int64_t i0, int64_t i1) {
        for (int64_t c = i0; c < i1; ++c) {
          uint64_t acc[4] = {};
          for (const void* base : {L.k, L.v}) {
            const uint64_t* p = static_cast<const uint64_t*>(base);
            for (int64_t w = words * c / 1024 / 4 * 4; w < words * (c + 1) / 1024 / 4 * 4; w += 4)
              for (int u = 0; u < 4; ++u) acc[u] += p[w + u];
          }
          sums[c * 8] += acc[0] + acc[1] + acc[2] + acc[3];
        }
      });
    }
    best_plain = std::min(best_plain, now_s() - t0);
    t0 = now_s();
    for (int64_t il = 0; il < n_layers; ++il) {
      const KvLayerView L = kv->layer_view(il);
      run_parallel(batch * n_kv, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const auto& blocks = kv->block_table(seq[i / n_kv]);
          uint64_t acc[4] = {};
          for (int64_t b = 0; b * bs < ctx; ++b)
            for (const void* base : {L.k, L.v}) {
              const uint64_t* p = static_cast<const uint64_t*>(base) + (blocks[b] * L.block_elems() + (i % n_kv) * L.tile()) * 2 / 8;
              for (int64_t w = 0; w < tile_words; w += 4)
                for (int u = 0; u < 4; ++u) acc[u] += p[w + u];
            }
          sums[(i % 1024) * 8] += acc[0] + acc[1] + acc[2] + acc[3];
        }
      });
    }
    best_tiles = std::min(best_tiles, now_s() - t0);
  }
  if (sums[8] == 42) std::printf(" ");
  const double pool_bytes = static_cast<double>(n_layers) * batch * blocks_per_seq * bs * 2 * n_kv * hd * 2;
  auto pf_name = [](const cpu::AttnPrefetch& p) {
    return p.blocks == 0 ? std::string("off") : strprintf("%d block%s ahead%s", p.blocks, p.blocks > 1 ? "s" : "", p.spread ? ", spread" : "");
  };
  std::printf("\n| pipeline: heads (q/kv) | layers x batch x context | calls | kernel | pages | prefetch | ms per layer | K/V GB/s | tiles read GB/s | plain read GB/s |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (size_t vi = 0; vi < variants.size(); ++vi)
    std::printf("| %lld / %lld | %lld x %lld x %lld | %lld per layer | %s | %s | %s | %.2f | %.1f | %.1f | %.1f |\n", (long long)n_heads, (long long)n_kv,
                (long long)n_layers, (long long)batch, (long long)ctx, (long long)parts, cpu::attn_isa_name(isa),
                strprintf("%.0f%% huge", 100.0 * static_cast<double>(kv->huge_page_bytes()) / static_cast<double>(std::max<int64_t>(1, kv->host_bytes()))).c_str(),
                pf_name(variants[vi]).c_str(), best_of[vi] * 1e3 / n_layers, bytes / best_of[vi] / 1e9, bytes / best_tiles / 1e9, pool_bytes / best_plain / 1e9);
  std::printf("\n| calls (prefetch %s, blocks %s) | ms per layer | K/V GB/s |\n|---|---|---|\n", pf_name(variants[0]).c_str(),
              churn ? "churned" : "in order");
  for (int pi = 0; pi < 4; ++pi)
    std::printf("| %s | %.2f | %.1f |\n", patterns[pi].name, best_pattern[pi] * 1e3 / n_layers, bytes / best_pattern[pi] / 1e9);
  if (!beside.empty()) {
    std::printf("\n| beside H2D copies (prefetch %s): copies | copy GB/s | K/V GB/s | together GB/s |\n|---|---|---|---|\n", pf_name(variants[0]).c_str());
    for (const Beside& b : beside)
      std::printf("| %s | %.1f | %.1f | %.1f |\n", b.pace > 0 ? strprintf("paced at %.0f GB/s", b.pace).c_str() : "back to back", b.copy_gbs, b.kv_gbs,
                  b.copy_gbs + b.kv_gbs);
  }
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t batch = argc > 2 ? std::atoll(argv[1]) : 64, ctx = argc > 2 ? std::atoll(argv[2]) : 1024;
  struct Shape {
    const char* name;
    int64_t n_heads, n_kv, hd;
  };
  if (argc > 5) {
    pipeline_table(batch, ctx, std::atoll(argv[3]), std::atoll(argv[4]), std::atoll(argv[5]), argc > 6 ? std::atoll(argv[6]) : 2);
    return 0;
  }
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
