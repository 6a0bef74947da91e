#include "cpu/attention.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <tbb/parallel_for.h>

#include "runtime/topology.h"

namespace ferry::cpu {

namespace {

// Online-softmax update of one query row for one block of scores s[bs] (valid keys [a, e), a < e):
// rescales the running sum l and acc[hd] when the maximum m grows and leaves the block's weights in
// s (0 outside [a, e)).
void softmax_row(int64_t bs, int64_t a, int64_t e, float* s, float& m, float& l, float* acc, int64_t hd) {
  float bmax = m;
  for (int64_t j = a; j < e; ++j) bmax = std::max(bmax, s[j]);
  if (bmax > m) {
    const float corr = std::exp(m - bmax);  // 0 on the first block (m = -inf, acc = 0)
    l *= corr;
    for (int64_t i = 0; i < hd; ++i) acc[i] *= corr;
    m = bmax;
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < a; ++j) s[j] = 0.0f;
  for (int64_t j = a; j < e; ++j) sum += (s[j] = std::exp(s[j] - bmax));
  for (int64_t j = e; j < bs; ++j) s[j] = 0.0f;
  l += sum;
}

// The same for G rows (sc: G x bs) sharing one key range.
void softmax_block(int64_t G, int64_t bs, int64_t a, int64_t e, float* sc, float* m, float* l, float* acc, int64_t hd) {
  for (int64_t g = 0; g < G; ++g) softmax_row(bs, a, e, sc + g * bs, m[g], l[g], acc + g * hd, hd);
}

// Software prefetch of K and V tiles of one head (bs x hd BF16 each) ahead of the block being
// computed. A sequence's tiles lie a block apart (every KV head's tile in between), and the
// hardware prefetcher stops at page edges, so without this each block starts with a memory round
// trip. attn_prefetch() (attention.h) says how far ahead, and whether the kernels spread them.
std::atomic<int> g_prefetch_blocks{-1}, g_prefetch_spread{1};
inline void load_prefetch_env() {
  if (g_prefetch_blocks.load(std::memory_order_relaxed) >= 0) return;
  const char* e = std::getenv("FERRY_ATTN_PREFETCH");
  const char* sp = std::getenv("FERRY_ATTN_PREFETCH_SPREAD");
  g_prefetch_spread.store(sp && std::string(sp) == "0" ? 0 : 1);
  g_prefetch_blocks.store(e ? std::clamp(std::atoi(e), 0, 8) : 1);
}
inline void prefetch_tile(const char* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}
// Called at block b of a chunk whose first block is b_first (d = blocks ahead): the first call
// prefetches blocks b + 1 .. b + d, later ones block b + d (the others were asked for already);
// `spread`: leave block b + d to the caller (the kernel spreads it over its steps).
inline void prefetch_ahead(const uint16_t* k, const uint16_t* v, int64_t block_elems, const int32_t* blocks, int64_t b, int64_t b_first,
                           int64_t bs, int64_t j1, int64_t tile_bytes, int d, bool spread = false) {
  if (d <= 0) return;
  const int64_t last = spread ? b + d - 1 : b + d;
  for (int64_t nb = b == b_first ? b + 1 : b + d; nb <= last && nb * bs < j1; ++nb) {
    prefetch_tile(reinterpret_cast<const char*>(k + static_cast<int64_t>(blocks[nb]) * block_elems), tile_bytes);
    prefetch_tile(reinterpret_cast<const char*>(v + static_cast<int64_t>(blocks[nb]) * block_elems), tile_bytes);
  }
}

inline float as_f32(float x) { return x; }
inline float as_f32(uint16_t x) { return bf16_to_f32(x); }

// The reference kernel: any dtype, block size and head_dim (even).
template <typename T>
void attend_chunk_scalar(const float* q, int64_t G, int64_t hd, const T* k, const T* v, int64_t block_elems, const int32_t* blocks,
                         int64_t bs, int64_t j0, int64_t j1, float* m, float* l, float* acc, float* sc) {
  for (int64_t b = j0 / bs; b * bs < j1; ++b) {
    const int64_t a = std::max(j0, b * bs) - b * bs, e = std::min(j1, (b + 1) * bs) - b * bs;
    const T* kt = k + static_cast<int64_t>(blocks[b]) * block_elems;
    const T* vt = v + static_cast<int64_t>(blocks[b]) * block_elems;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = a; j < e; ++j) {
        float s = 0.0f;
        for (int64_t i = 0; i < hd; ++i) s += q[g * hd + i] * as_f32(kt[KvCache::k_index(j, i, bs)]);
        sc[g * bs + j] = s;
      }
    softmax_block(G, bs, a, e, sc, m, l, acc, hd);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = a; j < e; ++j) {
        const float p = sc[g * bs + j];
        for (int64_t i = 0; i < hd; ++i) acc[g * hd + i] += p * as_f32(vt[KvCache::v_index(j, i, hd)]);
      }
  }
}

// The tile kernel's arithmetic (amx::attend_rows below) in scalar code: q and P rounded to BF16,
// float32 sums. paged_attention runs it when AMX is asked for on a CPU without it, so the tile
// path's grouping, per-row key ranges and merges are tested on every machine; only the tile
// instructions themselves need an AMX CPU.
void attend_rows_emulated(const uint16_t* qb, int M, int64_t hd, const uint16_t* k, const uint16_t* v, int64_t block_elems,
                          const int32_t* blocks, int64_t bs, int64_t j0, int64_t j1, const int64_t* lo, const int64_t* hi, float* m,
                          float* l, float* acc, float* sc) {
  for (int64_t b = j0 / bs; b * bs < j1; ++b) {
    const int64_t base = b * bs;
    const uint16_t* kt = k + static_cast<int64_t>(blocks[b]) * block_elems;
    const uint16_t* vt = v + static_cast<int64_t>(blocks[b]) * block_elems;
    for (int r = 0; r < M; ++r) {
      float* s = sc + r * bs;
      const int64_t a = std::max<int64_t>(std::max(j0, lo[r]) - base, 0), e = std::min<int64_t>(std::min(j1, hi[r]) - base, bs);
      if (a >= e) continue;
      for (int64_t j = a; j < e; ++j) {
        float x = 0.0f;
        for (int64_t i = 0; i < hd; ++i) x += bf16_to_f32(qb[r * hd + i]) * bf16_to_f32(kt[KvCache::k_index(j, i, bs)]);
        s[j] = x;
      }
      softmax_row(bs, a, e, s, m[r], l[r], acc + r * hd, hd);
      for (int64_t j = a; j < e; ++j) s[j] = bf16_to_f32(f32_to_bf16(s[j]));  // P enters the tiles as BF16
      for (int64_t j = a; j < e; ++j)
        for (int64_t i = 0; i < hd; ++i) acc[r * hd + i] += s[j] * bf16_to_f32(vt[KvCache::v_index(j, i, hd)]);
    }
  }
}

using ChunkFn = void (*)(const float*, int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t, const int32_t*, int64_t, int64_t,
                         int64_t, float*, float*, float*, float*);

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using V = __m256;
using VI = __m256i;
constexpr int W = 8;
constexpr int kQkRows = 2, kPvRows = 2, kPvCols = 4;
inline VI ld_raw(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline V lo_of(VI r) { return _mm256_castsi256_ps(_mm256_slli_epi32(r, 16)); }
inline V hi_of(VI r) { return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u)))); }
inline V vset1(float x) { return _mm256_set1_ps(x); }
inline V vzero() { return _mm256_setzero_ps(); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, V x) { _mm256_storeu_ps(p, x); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
inline float hsum(V x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float hmax(V x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline V vround(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V vpow2i(V n) {  // 2^n for integral n in the normal range
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline V vzero_unless_gt(V y, V x, float t) { return _mm256_and_ps(y, _mm256_cmp_ps(x, _mm256_set1_ps(t), _CMP_GT_OQ)); }
#include "cpu/attention_kernel.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_setzero_ps
namespace avx512 {
using V = __m512;
using VI = __m512i;
constexpr int W = 16;
constexpr int kQkRows = 4, kPvRows = 2, kPvCols = 8;
inline VI ld_raw(const uint16_t* p) { return _mm512_loadu_si512(p); }
inline V lo_of(VI r) { return _mm512_castsi512_ps(_mm512_slli_epi32(r, 16)); }
inline V hi_of(VI r) { return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)))); }
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vzero() { return _mm512_setzero_ps(); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, V x) { _mm512_storeu_ps(p, x); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline float hsum(V x) { return _mm512_reduce_add_ps(x); }
inline float hmax(V x) { return _mm512_reduce_max_ps(x); }
inline V vround(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V vpow2i(V n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline V vzero_unless_gt(V y, V x, float t) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(t), _CMP_GT_OQ), y); }
#include "cpu/attention_kernel.inc"
}  // namespace avx512
#pragma GCC pop_options

// AMX: up to 16 query rows (the query heads of a GQA group, and several tokens of one sequence in
// a prefill) against a block at a time, on tiles. The K tile's layout ([head_dim/2][block][2]) is
// already the B operand of TDPBF16PS for Q K^T, and the V tile's ([block/2][head_dim][2]) that of
// P V: blocks are loaded as they lie. Q and P are rounded to BF16 (the tile unit's input type), so
// this kernel is accurate to BF16 (about 1e-2 of |out|), not to float32 like the vector kernels.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma,amx-tile,amx-bf16")
namespace amx {
using namespace avx512;
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
// Tiles: 0 scores (M x 16 float), 1 K (16 dim pairs x 16 keys), 2 output (M x 16 float), 3 Q
// (M x 32 dims), 4 P (M x bs keys), 5 V (bs/2 key pairs x 16 dims).
void configure(int M, int64_t bs) {
  TileConfig c;
  auto set = [&](int t, int rows, int colsb) {
    c.rows[t] = static_cast<uint8_t>(rows);
    c.colsb[t] = static_cast<uint16_t>(colsb);
  };
  set(0, M, 64);
  set(1, 16, 64);
  set(2, M, 64);
  set(3, M, 64);
  set(4, M, static_cast<int>(bs * 2));
  set(5, static_cast<int>(bs / 2), 64);
  // Not _tile_loadconfig: GCC 12's declares only the first 8 bytes as read, so the stores of the
  // rows and widths above were dropped as dead (every tile left unconfigured: SIGILL).
  __asm__ volatile("ldtilecfg %0" : : "m"(c));
}
void release() { __asm__ volatile("tilerelease" ::: "memory"); }
// The tile instructions as asm that tells the compiler what memory they touch: GCC 12's intrinsics
// carry no memory operand or clobber, so stores feeding a tile load could be moved past it and
// values a tile store wrote could be read from stale registers.
#define FERRY_TILE_LOAD(t, base, stride) __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define FERRY_TILE_STORE(t, base, stride) __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define FERRY_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define FERRY_TILE_DPBF16(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

// 16 non-negative floats to BF16, rounded to nearest even.
inline __m256i to_bf16(V x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16));
}

// M rows of one sequence and KV head (qb: [M][hd] BF16, scaled) over keys [j0, j1), row r only over
// [lo[r], hi[r]): updates m[M], l[M], acc[M][hd]. sc: M x bs floats, pb: M x bs BF16 scratch.
// Needs configure(M, bs), bs 16 or 32, hd a multiple of 32.
void attend_rows(const uint16_t* qb, int M, int64_t hd, const uint16_t* k, const uint16_t* v, int64_t block_elems, const int32_t* blocks,
                 int64_t bs, int64_t j0, int64_t j1, const int64_t* lo, const int64_t* hi, float* m, float* l, float* acc, float* sc,
                 uint16_t* pb) {
  load_prefetch_env();
  const int d = g_prefetch_blocks.load(std::memory_order_relaxed);
  const bool spread = d > 0 && g_prefetch_spread.load(std::memory_order_relaxed) != 0;
  const int64_t tile_bytes = bs * hd * 2;
  for (int64_t b = j0 / bs; b * bs < j1; ++b) {
    const int64_t base = b * bs;
    const uint16_t* kt = k + static_cast<int64_t>(blocks[b]) * block_elems;
    const uint16_t* vt = v + static_cast<int64_t>(blocks[b]) * block_elems;
    prefetch_ahead(k, v, block_elems, blocks, b, j0 / bs, bs, j1, tile_bytes, d, spread);
    // Spread: block b + d's K lines go out a share per QK tile step, its V lines per PV step.
    const bool ahead = spread && (b + d) * bs < j1;
    const char* kn = ahead ? reinterpret_cast<const char*>(k + static_cast<int64_t>(blocks[b + d]) * block_elems) : nullptr;
    const char* vn = ahead ? reinterpret_cast<const char*>(v + static_cast<int64_t>(blocks[b + d]) * block_elems) : nullptr;
    const int64_t k_share = tile_bytes / ((bs / 16) * (hd / 32)), v_share = tile_bytes / (hd / 16);
    for (int64_t n = 0; n < bs; n += 16) {
      FERRY_TILE_ZERO(0);
      for (int64_t c = 0; c < hd; c += 32) {
        if (ahead) prefetch_tile(kn + ((n / 16) * (hd / 32) + c / 32) * k_share, k_share);
        FERRY_TILE_LOAD(3, qb + c, hd * 2);
        FERRY_TILE_LOAD(1, kt + (c / 2) * bs * 2 + n * 2, bs * 4);
        FERRY_TILE_DPBF16(0, 3, 1);
      }
      FERRY_TILE_STORE(0, sc + n, bs * 4);
    }
    for (int r = 0; r < M; ++r) {
      float* s = sc + r * bs;
      const int64_t a = std::max<int64_t>(std::max(j0, lo[r]) - base, 0), e = std::min<int64_t>(std::min(j1, hi[r]) - base, bs);
      if (a >= e) {
        for (int64_t j = 0; j < bs; j += W) vstore(s + j, vzero());
      } else {
        softmax_row_vec(bs, a, e, s, m[r], l[r], acc + r * hd, hd);
      }
      for (int64_t j = 0; j < bs; j += W) _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + r * bs + j), to_bf16(vload(s + j)));
    }
    FERRY_TILE_LOAD(4, pb, bs * 2);
    for (int64_t c = 0; c < hd; c += 16) {
      if (ahead) prefetch_tile(vn + (c / 16) * v_share, v_share);
      FERRY_TILE_LOAD(2, acc + c, hd * 4);
      FERRY_TILE_LOAD(5, vt + c * 2, hd * 4);
      FERRY_TILE_DPBF16(2, 4, 5);
      FERRY_TILE_STORE(2, acc + c, hd * 4);
    }
  }
}
#undef FERRY_TILE_LOAD
#undef FERRY_TILE_STORE
#undef FERRY_TILE_ZERO
#undef FERRY_TILE_DPBF16
}  // namespace amx
#pragma GCC pop_options
#endif

int lanes(AttnIsa isa) { return isa == AttnIsa::kAvx512 || isa == AttnIsa::kAmx ? 16 : isa == AttnIsa::kAvx2 ? 8 : 1; }

}  // namespace

const char* attn_isa_name(AttnIsa isa) {
  switch (isa) {
    case AttnIsa::kAmx: return "amx";
    case AttnIsa::kAvx512: return "avx512";
    case AttnIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

bool attn_isa_supported(AttnIsa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (isa == AttnIsa::kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
  if (isa == AttnIsa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == AttnIsa::kAmx) return attn_isa_supported(AttnIsa::kAvx512) && amx_usable();
#endif
  return isa == AttnIsa::kScalar;
}

AttnIsa attn_isa_best() {
  static const AttnIsa best = [] {
    AttnIsa cap = AttnIsa::kAmx;
    if (const char* e = std::getenv("FERRY_ATTN_ISA")) {
      const std::string s = e;
      cap = s == "scalar" ? AttnIsa::kScalar : s == "avx2" ? AttnIsa::kAvx2 : s == "avx512" ? AttnIsa::kAvx512 : AttnIsa::kAmx;
    }
    for (AttnIsa i : {AttnIsa::kAmx, AttnIsa::kAvx512, AttnIsa::kAvx2})
      if (static_cast<int>(i) <= static_cast<int>(cap) && attn_isa_supported(i)) return i;
    return AttnIsa::kScalar;
  }();
  return best;
}

bool amx_usable() {
  static const bool usable = [] {
#if defined(__x86_64__) && defined(__linux__)
    unsigned eax, ebx, ecx, edx;
    __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
    if (!tile || !bf16) return false;
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // Linux: ask for the tile state (once per process)
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

AttnPrefetch attn_prefetch() {
  load_prefetch_env();
  return {g_prefetch_blocks.load(), g_prefetch_spread.load() != 0};
}

void set_attn_prefetch(const AttnPrefetch& p) {
  g_prefetch_spread.store(p.spread ? 1 : 0);
  g_prefetch_blocks.store(std::clamp(p.blocks, 0, 8));
}

void paged_attention(const AttnArgs& a, int64_t il, const KvCache& kv, AttnIsa isa) {
  const KvLayerView L = kv.layer_view(il);
  FERRY_CHECK_MSG(L.k != nullptr, "attention: this layer's KV has no host storage");
  const int64_t hd = L.head_dim, n_kv = L.n_kv_heads, bs = L.block_size, H = a.n_heads, G = H / n_kv, T = a.n_tokens;
  if (T == 0) return;
  // The vector kernels read BF16 tiles whose block size and head_dim are whole vectors; the tile
  // kernel also wants blocks of 16 or 32 keys, head_dim in 32s and a group of at most 16 heads.
  if (isa == AttnIsa::kAmx && (L.dtype != DType::kBF16 || (bs != 16 && bs != 32) || hd % 32 != 0 || G > 16))
    isa = attn_isa_supported(AttnIsa::kAvx512) ? AttnIsa::kAvx512 : attn_isa_supported(AttnIsa::kAvx2) ? AttnIsa::kAvx2 : AttnIsa::kScalar;
  if (L.dtype != DType::kBF16 || bs % lanes(isa) != 0 || hd % lanes(isa) != 0) isa = AttnIsa::kScalar;
  // AMX asked for where there is none (tests): the tile kernel's arithmetic in scalar code.
  const bool tiles = isa == AttnIsa::kAmx && amx_usable();
  ChunkFn vec = nullptr;
#if defined(__x86_64__)
  if (isa == AttnIsa::kAvx512 || (isa == AttnIsa::kAmx && attn_isa_supported(AttnIsa::kAvx512))) vec = avx512::attend_chunk;
  if (isa == AttnIsa::kAvx2) vec = avx2::attend_chunk;
#endif
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t q_stride = a.q_stride > 0 ? a.q_stride : H * hd;

  // Tasks: (run of tokens, KV head, key chunk). A run is one token, or with AMX up to 16 / G
  // consecutive tokens of one sequence (the rows of one tile). Chunks are whole blocks, sized so
  // there are several tasks per thread even for one long sequence.
  struct Task {
    int32_t t0, nt, kh;
    int64_t j0, j1;
    int64_t chunk;  // -1: the only chunk, written straight to out; else its index among the run's chunks
  };
  std::vector<Task> tasks;
  std::vector<int64_t> first(T);
  int64_t total = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = a.positions[t];
    first[t] = a.window > 0 ? std::max<int64_t>(0, p - a.window + 1) : 0;
    total += (p + 1 - first[t]) * n_kv;
  }
  const int64_t run_max = isa == AttnIsa::kAmx ? std::max<int64_t>(1, 16 / G) : 1;
  const int64_t threads = compute_threads();
  int64_t chunk = std::max<int64_t>(16 * bs, (total / (4 * threads) + bs - 1) / bs * bs);
  int64_t n_parts = 0;
  std::vector<int64_t> part_begin(T * n_kv, -1), part_count(T * n_kv, 1);
  for (int64_t t0 = 0; t0 < T;) {
    int64_t nt = 1;
    while (nt < run_max && t0 + nt < T && a.seq_ids[t0 + nt] == a.seq_ids[t0]) ++nt;
    int64_t j_begin = first[t0], j_end = 0;
    for (int64_t u = 0; u < nt; ++u) j_begin = std::min(j_begin, first[t0 + u]), j_end = std::max<int64_t>(j_end, a.positions[t0 + u] + 1);
    for (int64_t kh = 0; kh < n_kv; ++kh) {
      const int64_t n_chunks = (j_end - j_begin + chunk - 1) / chunk;
      if (n_chunks <= 1) {
        tasks.push_back({static_cast<int32_t>(t0), static_cast<int32_t>(nt), static_cast<int32_t>(kh), j_begin, j_end, -1});
        continue;
      }
      for (int64_t u = 0; u < nt; ++u) {
        part_begin[(t0 + u) * n_kv + kh] = n_parts;
        part_count[(t0 + u) * n_kv + kh] = n_chunks;
        n_parts += n_chunks;
      }
      // Chunk edges on block boundaries (the first chunk may start mid-block).
      int64_t j = j_begin;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t j1 = c + 1 == n_chunks ? j_end : std::min(j_end, (j_begin / bs + (c + 1) * (chunk / bs)) * bs);
        tasks.push_back({static_cast<int32_t>(t0), static_cast<int32_t>(nt), static_cast<int32_t>(kh), j, j1, c});
        j = j1;
      }
    }
    t0 += nt;
  }
  const int64_t part_floats = G * (hd + 2);
  std::vector<float> parts(static_cast<size_t>(n_parts * part_floats));

  auto write_out = [&](int64_t t, int64_t kh, const float* acc, const float* l) {
    for (int64_t g = 0; g < G; ++g) {
      const float inv = 1.0f / l[g];
      const int64_t o = (t * H + kh * G + g) * hd;
      if (a.out_bf16) {
        uint16_t* out = static_cast<uint16_t*>(a.out) + o;
        for (int64_t i = 0; i < hd; ++i) out[i] = f32_to_bf16(acc[g * hd + i] * inv);
      } else {
        float* out = static_cast<float*>(a.out) + o;
        for (int64_t i = 0; i < hd; ++i) out[i] = acc[g * hd + i] * inv;
      }
    }
  };
  // Row state of token u of a task: acc [G][hd], m [G], l [G] at row u * G.
  auto finish = [&](const Task& tk, int64_t u, const float* acc, const float* m, const float* l) {
    const int64_t t = tk.t0 + u;
    if (tk.chunk < 0) {
      write_out(t, tk.kh, acc, l);
      return;
    }
    float* pp = parts.data() + (part_begin[t * n_kv + tk.kh] + tk.chunk) * part_floats;
    std::copy(acc, acc + G * hd, pp);
    std::copy(m, m + G, pp + G * hd);
    std::copy(l, l + G, pp + G * hd + G);
  };

  run_parallel(static_cast<int64_t>(tasks.size()), [&](int64_t i0, int64_t i1) {
    const int64_t R = run_max * G;  // rows of the largest task
    thread_local std::vector<float> buf;
    thread_local std::vector<uint16_t> bbuf;
    buf.resize(static_cast<size_t>(R * hd * 2 + R * bs + 2 * R));
    bbuf.resize(static_cast<size_t>(R * hd + R * bs));
    float* q = buf.data();
    float* acc = q + R * hd;
    float* sc = acc + R * hd;
    float* m = sc + R * bs;
    float* l = m + R;
    int tiles_for = -1;  // the row count the AMX tiles are configured for
    for (int64_t i = i0; i < i1; ++i) {
      const Task& tk = tasks[i];
      const int64_t rows = tk.nt * G;
      for (int64_t u = 0; u < tk.nt; ++u) {
        const int64_t q0 = (tk.t0 + u) * q_stride + tk.kh * G * hd;
        float* qu = q + u * G * hd;
        if (a.q_bf16) {
          const uint16_t* qs = static_cast<const uint16_t*>(a.q) + q0;
          for (int64_t x = 0; x < G * hd; ++x) qu[x] = bf16_to_f32(qs[x]) * scale;
        } else {
          const float* qs = static_cast<const float*>(a.q) + q0;
          for (int64_t x = 0; x < G * hd; ++x) qu[x] = qs[x] * scale;
        }
      }
      std::fill(acc, acc + rows * hd, 0.0f);
      std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
      std::fill(l, l + rows, 0.0f);
      const auto& blocks = kv.block_table(a.seq_ids[tk.t0]);
      const int64_t head = tk.kh * L.tile();
      const uint16_t* kb = static_cast<const uint16_t*>(L.k) + head;
      const uint16_t* vb = static_cast<const uint16_t*>(L.v) + head;
#if defined(__x86_64__)
      if (isa == AttnIsa::kAmx && rows >= 4) {
        uint16_t* qb = bbuf.data();
        uint16_t* pb = qb + R * hd;
        for (int64_t x = 0; x < rows * hd; ++x) qb[x] = f32_to_bf16(q[x]);
        int64_t lo[16], hi[16];
        for (int64_t r = 0; r < rows; ++r) lo[r] = first[tk.t0 + r / G], hi[r] = a.positions[tk.t0 + r / G] + 1;
        if (!tiles) {
          attend_rows_emulated(qb, static_cast<int>(rows), hd, kb, vb, L.block_elems(), blocks.data(), bs, tk.j0, tk.j1, lo, hi, m, l, acc, sc);
        } else {
          if (tiles_for != rows) amx::configure(static_cast<int>(rows), bs), tiles_for = static_cast<int>(rows);
          amx::attend_rows(qb, static_cast<int>(rows), hd, kb, vb, L.block_elems(), blocks.data(), bs, tk.j0, tk.j1, lo, hi, m, l, acc, sc, pb);
        }
        for (int64_t u = 0; u < tk.nt; ++u) finish(tk, u, acc + u * G * hd, m + u * G, l + u * G);
        continue;
      }
#endif
      for (int64_t u = 0; u < tk.nt; ++u) {
        const int64_t t = tk.t0 + u;
        const int64_t j0 = std::max(tk.j0, first[t]), j1 = std::min<int64_t>(tk.j1, a.positions[t] + 1);
        float *qu = q + u * G * hd, *au = acc + u * G * hd, *mu = m + u * G, *lu = l + u * G;
        if (j0 < j1) {
          if (vec) {
            vec(qu, G, hd, kb, vb, L.block_elems(), blocks.data(), bs, j0, j1, mu, lu, au, sc);
          } else if (L.dtype == DType::kBF16) {
            attend_chunk_scalar(qu, G, hd, kb, vb, L.block_elems(), blocks.data(), bs, j0, j1, mu, lu, au, sc);
          } else {
            attend_chunk_scalar(qu, G, hd, static_cast<const float*>(L.k) + head, static_cast<const float*>(L.v) + head, L.block_elems(),
                                blocks.data(), bs, j0, j1, mu, lu, au, sc);
          }
        }
        finish(tk, u, au, mu, lu);
      }
    }
#if defined(__x86_64__)
    if (tiles_for >= 0) amx::release();
#endif
  });
  if (n_parts == 0) return;
  // Merge the chunks of each split (token, head).
  run_parallel(T * n_kv, [&](int64_t i0, int64_t i1) {
    std::vector<float> acc(G * hd), l(G);
    for (int64_t i = i0; i < i1; ++i) {
      if (part_begin[i] < 0) continue;
      for (int64_t g = 0; g < G; ++g) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < part_count[i]; ++c) mx = std::max(mx, parts[(part_begin[i] + c) * part_floats + G * hd + g]);
        float sum = 0.0f;
        std::fill(acc.begin() + g * hd, acc.begin() + (g + 1) * hd, 0.0f);
        for (int64_t c = 0; c < part_count[i]; ++c) {
          const float* pp = parts.data() + (part_begin[i] + c) * part_floats;
          const float w = std::exp(pp[G * hd + g] - mx);
          sum += w * pp[G * hd + G + g];
          for (int64_t x = 0; x < hd; ++x) acc[g * hd + x] += w * pp[g * hd + x];
        }
        l[g] = sum;
      }
      write_out(i / n_kv, i % n_kv, acc.data(), l.data());
    }
  });
}

void attention(const float* q, int64_t n_tokens, const int32_t* positions, const int32_t* seq_ids, int64_t n_heads, int64_t window,
               int64_t il, const KvCache& kv, float* out) {
  AttnArgs a;
  a.q = q;
  a.n_tokens = n_tokens;
  a.positions = positions;
  a.seq_ids = seq_ids;
  a.n_heads = n_heads;
  a.window = window;
  a.out = out;
  paged_attention(a, il, kv);
}

}  // namespace ferry::cpu
