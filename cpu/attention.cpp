#include "cpu/attention.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
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

// Online-softmax update for one block of scores (sc: G rows of bs; valid keys [a, e)): rescales the
// running sums when the maximum grows and leaves the block's weights in sc (0 outside [a, e)).
void softmax_block(int64_t G, int64_t bs, int64_t a, int64_t e, float* sc, float* m, float* l, float* acc, int64_t hd) {
  for (int64_t g = 0; g < G; ++g) {
    float* s = sc + g * bs;
    float bmax = m[g];
    for (int64_t j = a; j < e; ++j) bmax = std::max(bmax, s[j]);
    if (bmax > m[g]) {
      const float corr = std::exp(m[g] - bmax);  // 0 on the first block (m = -inf, acc = 0)
      l[g] *= corr;
      float* ag = acc + g * hd;
      for (int64_t i = 0; i < hd; ++i) ag[i] *= corr;
      m[g] = bmax;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < a; ++j) s[j] = 0.0f;
    for (int64_t j = a; j < e; ++j) sum += (s[j] = std::exp(s[j] - bmax));
    for (int64_t j = e; j < bs; ++j) s[j] = 0.0f;
    l[g] += sum;
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
#endif

int lanes(AttnIsa isa) { return isa == AttnIsa::kAvx512 ? 16 : isa == AttnIsa::kAvx2 ? 8 : 1; }

}  // namespace

const char* attn_isa_name(AttnIsa isa) {
  switch (isa) {
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
#endif
  return isa == AttnIsa::kScalar;
}

AttnIsa attn_isa_best() {
  static const AttnIsa best = [] {
    AttnIsa cap = AttnIsa::kAvx512;
    if (const char* e = std::getenv("FERRY_ATTN_ISA")) {
      const std::string s = e;
      cap = s == "scalar" ? AttnIsa::kScalar : s == "avx2" ? AttnIsa::kAvx2 : AttnIsa::kAvx512;
    }
    for (AttnIsa i : {AttnIsa::kAvx512, AttnIsa::kAvx2})
      if (static_cast<int>(i) <= static_cast<int>(cap) && attn_isa_supported(i)) return i;
    return AttnIsa::kScalar;
  }();
  return best;
}

bool amx_usable() {
#if defined(__x86_64__) && defined(__linux__)
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
  if (!tile || !bf16) return false;
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // Linux: ask for the tile state
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

void paged_attention(const AttnArgs& a, int64_t il, const KvCache& kv, AttnIsa isa) {
  const KvLayerView L = kv.layer_view(il);
  FERRY_CHECK_MSG(L.k != nullptr, "attention: this layer's KV has no host storage");
  const int64_t hd = L.head_dim, n_kv = L.n_kv_heads, bs = L.block_size, H = a.n_heads, G = H / n_kv, T = a.n_tokens;
  if (T == 0) return;
  // The vector kernels read BF16 tiles whose block size and head_dim are whole vectors.
  if (L.dtype != DType::kBF16 || bs % lanes(isa) != 0 || hd % lanes(isa) != 0) isa = AttnIsa::kScalar;
  ChunkFn vec = nullptr;
#if defined(__x86_64__)
  if (isa == AttnIsa::kAvx512) vec = avx512::attend_chunk;
  if (isa == AttnIsa::kAvx2) vec = avx2::attend_chunk;
#endif
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int64_t q_stride = a.q_stride > 0 ? a.q_stride : H * hd;

  // Tasks: (token, KV head, key chunk). Chunks are whole blocks, sized so there are several tasks
  // per thread even for one long sequence.
  struct Task {
    int32_t t, kh;
    int64_t j0, j1;
    int64_t part;  // -1: the only chunk, written straight to out; else its slot in `parts`
  };
  std::vector<Task> tasks;
  std::vector<int64_t> first(T);
  int64_t total = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = a.positions[t];
    first[t] = a.window > 0 ? std::max<int64_t>(0, p - a.window + 1) : 0;
    total += (p + 1 - first[t]) * n_kv;
  }
  const int64_t threads = compute_threads();
  int64_t chunk = std::max<int64_t>(16 * bs, (total / (4 * threads) + bs - 1) / bs * bs);
  int64_t n_parts = 0;
  std::vector<int64_t> part_begin(T * n_kv, -1), part_count(T * n_kv, 1);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t j_end = a.positions[t] + 1;
    for (int64_t kh = 0; kh < n_kv; ++kh) {
      const int64_t n_chunks = (j_end - first[t] + chunk - 1) / chunk;
      if (n_chunks <= 1) {
        tasks.push_back({static_cast<int32_t>(t), static_cast<int32_t>(kh), first[t], j_end, -1});
        continue;
      }
      part_begin[t * n_kv + kh] = n_parts;
      part_count[t * n_kv + kh] = n_chunks;
      // Chunk edges on block boundaries (the first chunk may start mid-block).
      int64_t j = first[t];
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t j1 = c + 1 == n_chunks ? j_end : std::min(j_end, (first[t] / bs + (c + 1) * (chunk / bs)) * bs);
        tasks.push_back({static_cast<int32_t>(t), static_cast<int32_t>(kh), j, j1, n_parts++});
        j = j1;
      }
    }
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

  run_parallel(static_cast<int64_t>(tasks.size()), [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> buf;
    buf.resize(static_cast<size_t>(G * hd * 2 + G * bs + 2 * G));
    float* q = buf.data();
    float* acc = q + G * hd;
    float* sc = acc + G * hd;
    float* m = sc + G * bs;
    float* l = m + G;
    for (int64_t i = i0; i < i1; ++i) {
      const Task& tk = tasks[i];
      const int64_t q0 = tk.t * q_stride + tk.kh * G * hd;
      if (a.q_bf16) {
        const uint16_t* qs = static_cast<const uint16_t*>(a.q) + q0;
        for (int64_t x = 0; x < G * hd; ++x) q[x] = bf16_to_f32(qs[x]) * scale;
      } else {
        const float* qs = static_cast<const float*>(a.q) + q0;
        for (int64_t x = 0; x < G * hd; ++x) q[x] = qs[x] * scale;
      }
      std::fill(acc, acc + G * hd, 0.0f);
      std::fill(m, m + G, -std::numeric_limits<float>::infinity());
      std::fill(l, l + G, 0.0f);
      const auto& blocks = kv.block_table(a.seq_ids[tk.t]);
      const int64_t head = tk.kh * L.tile();
      if (vec) {
        vec(q, G, hd, static_cast<const uint16_t*>(L.k) + head, static_cast<const uint16_t*>(L.v) + head, L.block_elems(), blocks.data(), bs,
            tk.j0, tk.j1, m, l, acc, sc);
      } else if (L.dtype == DType::kBF16) {
        attend_chunk_scalar(q, G, hd, static_cast<const uint16_t*>(L.k) + head, static_cast<const uint16_t*>(L.v) + head, L.block_elems(),
                            blocks.data(), bs, tk.j0, tk.j1, m, l, acc, sc);
      } else {
        attend_chunk_scalar(q, G, hd, static_cast<const float*>(L.k) + head, static_cast<const float*>(L.v) + head, L.block_elems(),
                            blocks.data(), bs, tk.j0, tk.j1, m, l, acc, sc);
      }
      if (tk.part < 0) {
        write_out(tk.t, tk.kh, acc, l);
      } else {
        float* pp = parts.data() + tk.part * part_floats;
        std::copy(acc, acc + G * hd, pp);
        std::copy(m, m + G, pp + G * hd);
        std::copy(l, l + G, pp + G * hd + G);
      }
    }
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
