// CPU attention over the paged host KV cache (offload/kv_cache.h): decode and prefill, F32 or BF16
// K/V, float32 math, online softmax. Per (token, KV head) every K/V tile is read once for all query
// heads of its group; long key ranges are split into chunks (oneTBB tasks over token x head x chunk,
// merged afterwards) so one sequence still uses every core.
//
// Kernels, picked at run time (CPUID): AVX-512 and AVX2 for BF16 K/V (a BF16 pair is widened to two
// float32 vectors with one shift and one mask: no conversion instructions), and a scalar kernel for
// every dtype and shape (the reference the others are tested against; also what F32 pools use).
// With AMX (and the Linux permission for its tile state), tasks take up to 16 query rows at once,
// the heads of a GQA group times consecutive tokens of one sequence, on tiles: GQA decode with
// groups of 4 or more and prefill chunks. Fewer rows run on AVX-512.
#pragma once

#include <cstdint>

#include "offload/kv_cache.h"

namespace ferry::cpu {

enum class AttnIsa { kScalar, kAvx2, kAvx512, kAmx };
const char* attn_isa_name(AttnIsa isa);
// Returns true when this CPU runs `isa`'s kernel.
bool attn_isa_supported(AttnIsa isa);
// Returns the best kernel this CPU runs (FERRY_ATTN_ISA=scalar|avx2|avx512|amx caps it).
AttnIsa attn_isa_best();
// Returns true when the CPU has AMX-BF16 and Linux granted this process the tile state.
bool amx_usable();

// Software prefetch of the K/V tiles ahead of the block being computed: `blocks` ahead (0: none),
// into L1. Every kernel spreads a block's prefetches over its steps (K's during QK, V's during PV;
// the vector kernels one row of the next tile per row step, over whole blocks); all at the block's
// start instead, the requests queue behind each other and stall the work (H100 host, notes/kv.md:
// tile kernel 72-83 against 103-114 GB/s, AVX-512 kernel on MHA heads 82 against 95). From
// FERRY_ATTN_PREFETCH=N (default 1) and FERRY_ATTN_PREFETCH_SPREAD=0|1 (default 1) at the first
// call; set_attn_prefetch overrides them (bench_cpu_attention compares them).
struct AttnPrefetch {
  int blocks = 1;
  bool spread = true;
};
AttnPrefetch attn_prefetch();
void set_attn_prefetch(const AttnPrefetch& p);

struct AttnArgs {
  const void* q = nullptr;        // [n_tokens, n_heads, head_dim], RoPE applied
  bool q_bf16 = false;            // q is BF16 bits (else float32)
  int64_t q_stride = 0;           // elements from one token's q to the next (0: n_heads * head_dim)
  int64_t n_tokens = 0;
  const int32_t* positions = nullptr;  // [n_tokens]
  const int32_t* seq_ids = nullptr;    // [n_tokens]
  int64_t n_heads = 0;
  int64_t window = 0;             // sliding window (0: none)
  void* out = nullptr;            // [n_tokens, n_heads, head_dim]
  bool out_bf16 = false;          // write BF16 bits (else float32)
};

// Causal attention of layer `il`: token t of sequence s at position p attends to positions
// [max(0, p - window + 1), p] of s, whose K/V are already in `kv`'s host storage.
void paged_attention(const AttnArgs& a, int64_t il, const KvCache& kv, AttnIsa isa);
inline void paged_attention(const AttnArgs& a, int64_t il, const KvCache& kv) { paged_attention(a, il, kv, attn_isa_best()); }

// Float32 q and out (the CPU executor's call).
void attention(const float* q, int64_t n_tokens, const int32_t* positions, const int32_t* seq_ids, int64_t n_heads,
               int64_t window, int64_t il, const KvCache& kv, float* out);

}  // namespace ferry::cpu
