#include "cpu/simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__x86_64__)
// GCC 12 warns inside its own AVX-512 headers (their _mm512_undefined_* placeholders) once the
// intrinsics are inlined into target("avx512f") functions: a known false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#endif

#include "models/weight_format.h"
#include "runtime/tensor.h"

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define FERRY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FERRY_CLONES
#endif

namespace ferry::cpu {

FERRY_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
namespace {
bool have_avx512();
bool have_vbmi();
bool have_avx2();

// The map's 256 floats as four byte planes of 256 bytes (plane j: byte j of each float), each plane
// four 64-byte registers' worth: a byte permute of two registers (vpermt2b, 7 index bits) covers 128
// entries, a second one merged under the code's top bit the other 128.
struct MapPlanes {
  alignas(64) uint8_t b[4][256];
  MapPlanes() {
    const float* map = dynamic_map_signed();
    for (int c = 0; c < 256; ++c) {
      uint32_t u;
      std::memcpy(&u, &map[c], 4);
      for (int j = 0; j < 4; ++j) b[j][c] = static_cast<uint8_t>(u >> (8 * j));
    }
  }
};

// The map's values of 64 codes at a time without a gather: each byte plane looked up by two byte
// permutes and a blend on the code's top bit, the four planes interleaved back into floats by
// unpacks. The unpacks leave 128-bit lane L of the q-th result holding elements 16L + 4q .. +3, so the
// codes are permuted first so that each result holds 16 consecutive elements. A Llama-3-70B layer's
// products on one Zen 5 thread over L2-resident weights (bench_cpu_gemm --layer --hot): 0.026 ms
// against 0.030 with the gathers (NF4's fp32 absmax: 0.025); a scalar loop was slower than the gathers.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))) void dynamic_map_lookup_vbmi(const uint8_t* codes, int64_t n, float* out) {
  static const MapPlanes planes;
  __m512i t[4][4];
  for (int j = 0; j < 4; ++j)
    for (int q = 0; q < 4; ++q) t[j][q] = _mm512_load_si512(planes.b[j] + 64 * q);
  alignas(64) static const uint8_t order[64] = {0,  1,  2,  3,  16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4,  5,  6,  7,  20, 21,
                                                22, 23, 36, 37, 38, 39, 52, 53, 54, 55, 8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43,
                                                56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  const __m512i perm = _mm512_load_si512(order);
  for (int64_t i = 0; i < n; i += 64) {
    const int64_t left = n - i;
    const __mmask64 k = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
    const __m512i c = _mm512_permutexvar_epi8(perm, _mm512_maskz_loadu_epi8(k, codes + i));
    const __mmask64 top = _mm512_movepi8_mask(c);
    __m512i p[4];
    for (int j = 0; j < 4; ++j)
      p[j] = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t[j][0], c, t[j][1]), _mm512_permutex2var_epi8(t[j][2], c, t[j][3]));
    const __m512i w_lo = _mm512_unpacklo_epi8(p[0], p[1]), w_hi = _mm512_unpackhi_epi8(p[0], p[1]);
    const __m512i z_lo = _mm512_unpacklo_epi8(p[2], p[3]), z_hi = _mm512_unpackhi_epi8(p[2], p[3]);
    const __m512i d[4] = {_mm512_unpacklo_epi16(w_lo, z_lo), _mm512_unpackhi_epi16(w_lo, z_lo), _mm512_unpacklo_epi16(w_hi, z_hi),
                          _mm512_unpackhi_epi16(w_hi, z_hi)};
    for (int q = 0; q < 4; ++q) {
      const int64_t m = std::min<int64_t>(16, std::max<int64_t>(0, left - 16 * q));
      if (m == 0) break;
      _mm512_mask_storeu_epi32(out + i + 16 * q, m == 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << m) - 1), d[q]);
    }
  }
}

// The map's values of n codes, 16 a gather (AVX-512 without VBMI).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void dynamic_map_lookup_gather(const uint8_t* codes, int64_t n, float* out) {
  const float* map = dynamic_map_signed();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, codes + i));
    _mm512_mask_storeu_ps(out + i, k, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, map, 4));
  }
}

// out's looked-up values times each 256-block's absmax2 plus its mean, in place, 16 at a time; the
// product and the sum rounded apart (explicit-rounding intrinsics: never contracted into a fused
// multiply-add).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void nf4dq_scale_avx512(const float* absmax2, const float* means, int64_t i0, int64_t n,
                                                                            float* out) {
  constexpr int kR = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t i = 0; i < n;) {
    const int64_t b = (i0 + i) >> 8, end = std::min(n, ((b + 1) << 8) - i0);
    const __m512 s = _mm512_set1_ps(absmax2[b]), m = _mm512_set1_ps(means[b]);
    for (; i < end; i += 16) {
      const __mmask16 k = end - i >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (end - i)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(k, out + i);
      _mm512_mask_storeu_ps(out + i, k, _mm512_add_round_ps(_mm512_mul_round_ps(v, s, kR), m, kR));
    }
    i = end;
  }
}
// The same with AVX2 (a CPU without AVX-512): 8 codes looked up by a gather, times the 256-block's
// absmax2, plus its mean; the product and the sum rounded apart, as the codec (built without FMA, which
// the compiler would contract them into: the codes then differed in the last bit), and the block's
// last codes through an 8-byte copy (no load past `codes`' end).
__attribute__((target("avx2"))) inline __m256 nf4dq_eight_avx2(const float* map, const uint8_t* c, __m256 s, __m256 m) {
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
  return _mm256_add_ps(_mm256_mul_ps(_mm256_i32gather_ps(map, idx, 4), s), m);
}
__attribute__((target("avx2"))) void nf4dq_absmax_avx2(const uint8_t* codes, const float* absmax2, const float* means, int64_t i0, int64_t n,
                                                          float* out) {
  const float* map = dynamic_map_signed();
  for (int64_t i = 0; i < n;) {
    const int64_t b = (i0 + i) >> 8, end = std::min(n, ((b + 1) << 8) - i0);
    const __m256 s = _mm256_set1_ps(absmax2[b]), m = _mm256_set1_ps(means[b]);
    for (; i + 8 <= end; i += 8) _mm256_storeu_ps(out + i, nf4dq_eight_avx2(map, codes + i0 + i, s, m));
    if (i < end) {
      uint8_t c[8] = {};
      alignas(32) float v[8];
      std::memcpy(c, codes + i0 + i, static_cast<size_t>(end - i));
      _mm256_store_ps(v, nf4dq_eight_avx2(map, c, s, m));
      std::memcpy(out + i, v, static_cast<size_t>(end - i) * sizeof(float));
      i = end;
    }
  }
}
}  // namespace
#endif

MapLookup dynamic_map_values(const uint8_t* codes, int64_t n, float* out, MapLookup how) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (how == MapLookup::kBest) {
    // FERRY_CPU_MAP_LOOKUP=gather|scalar picks a slower path (to time the difference).
    static const MapLookup best = [] {
      const char* e = std::getenv("FERRY_CPU_MAP_LOOKUP");
      const std::string v = e ? e : "";
      if (v == "scalar") return MapLookup::kScalar;
      if (v == "gather" && have_avx512()) return MapLookup::kGather;
      return have_vbmi() ? MapLookup::kVbmi : have_avx512() ? MapLookup::kGather : MapLookup::kScalar;
    }();
    how = best;
  }
  if (how == MapLookup::kVbmi && have_vbmi()) {
    dynamic_map_lookup_vbmi(codes, n, out);
    return how;
  }
  if (how == MapLookup::kGather && have_avx512()) {
    dynamic_map_lookup_gather(codes, n, out);
    return how;
  }
#endif
  const float* map = dynamic_map_signed();
  for (int64_t i = 0; i < n; ++i) out[i] = map[codes[i]];
  return MapLookup::kScalar;
}

void nf4dq_absmax(const uint8_t* codes, const float* absmax2, const float* means, int64_t i0, int64_t n, float* out) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_avx512()) {
    dynamic_map_values(codes + i0, n, out);
    return nf4dq_scale_avx512(absmax2, means, i0, n, out);
  }
  if (have_avx2()) return nf4dq_absmax_avx2(codes, absmax2, means, i0, n, out);
#endif
  const float* map = dynamic_map_signed();
  for (int64_t i = 0; i < n; ++i) {
    const float p = map[codes[i0 + i]] * absmax2[(i0 + i) >> 8];  // baseline x86-64: no FMA to contract into
    out[i] = p + means[(i0 + i) >> 8];
  }
}

FERRY_CLONES void bf16_to_f32_row(const uint16_t* src, float* dst, int64_t n) {
  // Built with -fno-strict-aliasing: the float buffer is written through its bit pattern.
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(src[i]) << 16;
}

FERRY_CLONES void q8_to_f32_row(const int8_t* q, float scale, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(q[i]) * scale;
}

FERRY_CLONES void f32_to_bf16_row(const float* src, uint16_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

void f16_to_f32_row(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

FERRY_CLONES void axpy_f32(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

FERRY_CLONES void scale_f32(float a, float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

FERRY_CLONES float sumsq_f32(const float* x, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
  return acc;
}

namespace {

// The ISA extensions the kernels dispatch on, read once (none under ASan: it runs the portable loops).
struct Isa {
  bool avx512 = false, vbmi = false, vnni = false, avx2 = false;
};
const Isa& isa() {
  static const Isa i = [] {
    Isa r;
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
    __builtin_cpu_init();
    r.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    r.vbmi = r.avx512 && __builtin_cpu_supports("avx512vbmi");
    r.vnni = r.avx512 && __builtin_cpu_supports("avx512vnni");
    r.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return r;
  }();
  return i;
}
bool have_avx512() { return isa().avx512; }
bool have_vbmi() { return isa().vbmi; }
bool have_vnni() { return isa().vnni; }
bool have_avx2() { return isa().avx2; }

// x's elements in the order the row kernels read them: each group of G elements becomes its P phases
// one after another (phase r: elements r, r + P, r + 2P, ...); a shorter last group the same with
// G = its length where that is `tail` (NF4's last block of 64), else as it is.
void split_phases_row(const float* x, int64_t K, int64_t G, int64_t P, int64_t tail, float* xs) {
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    const int64_t n = std::min(G, K - g0);
    if (n != G && n != tail) {
      std::memcpy(xs + g0, x + g0, static_cast<size_t>(n) * sizeof(float));
      break;
    }
    const int64_t per = n / P;
    for (int64_t r = 0; r < P; ++r)
      for (int64_t i = 0; i < per; ++i) xs[g0 + r * per + i] = x[g0 + P * i + r];
  }
}

// x's element e within a group of n (n % P == 0) split as above.
inline int64_t phase_pos(int64_t e, int64_t n, int64_t P) { return (e % P) * (n / P) + e / P; }

float nf4_dot_portable(const uint8_t* codes, const float* absmax, const float* xs, int64_t K) {
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 64; ++b) {
    const int64_t g0 = b / 2 * kNf4Group, n = std::min<int64_t>(kNf4Group, K - g0);
    float part = 0.0f;
    for (int64_t e = b * 64; e < b * 64 + 64; ++e) {
      const uint8_t c = codes[e / 2];
      part += kNf4Codes[e % 2 == 0 ? c >> 4 : c & 0x0f] * xs[g0 + phase_pos(e - g0, n, kNf4Phases)];
    }
    acc += part * absmax[b];
  }
  return acc;
}

float bf16_dot_portable(const uint16_t* w, const float* xs, int64_t K) {
  float acc = 0.0f;
  for (int64_t g0 = 0; g0 < K; g0 += kBf16Group) {
    const int64_t n = std::min<int64_t>(kBf16Group, K - g0);
    for (int64_t e = 0; e < n; ++e) acc += bf16_to_f32(w[g0 + e]) * xs[g0 + (n == kBf16Group ? phase_pos(e, n, 2) : e)];
  }
  return acc;
}

// Software prefetch distance of the row kernels, in bytes ahead of the weight read (0: none). The
// weights stream from host DRAM once per step and the hardware's streamer stops at each 4 KiB page;
// on the H200 host's 16-core Xeon, beside the copy engine's reads, NF4 rows read at 76.5 GB/s
// without it, 90.4 at 1 KiB and 99-103 at 4 KiB (8 and 16 KiB: no better; T1 / T2 / NTA hints and a
// second, farther prefetch into L2: no better either; notes/cpu.md). FERRY_CPU_PREFETCH overrides it.
int64_t prefetch_bytes() {
  static const int64_t d = [] {
    const char* e = std::getenv("FERRY_CPU_PREFETCH");
    return e && *e ? std::max<int64_t>(0, std::atoll(e)) : int64_t{4096};
  }();
  return d;
}

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
// 16 codes (one byte each holding two) -> the 32 weights' values without their block scale: the high
// nibbles (even elements) and the low nibbles (odd elements), each a 16-entry permute of the table.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void nf4_decode16(const uint8_t* codes, __m512 table, __m512& even, __m512& odd) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  odd = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0f)), table);
}

// The NF4 row kernels' per-group prologue: group g's prefetches (its codes', and every 8 groups its
// absmax'), and its two blocks' absmax as one vector (lanes 0-7 the first, 8-15 the second).
inline void nf4_prefetch_group(int64_t pf, const uint8_t* codes, const float* absmax, int64_t g) {
  if (pf > 0) {
    _mm_prefetch(reinterpret_cast<const char*>(codes + g * 64 + pf), _MM_HINT_T0);
    if ((g & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(absmax + 2 * g + pf / 32), _MM_HINT_T0);
  }
}
__attribute__((target("avx512f"))) inline __m512 nf4_pair_scale(const float* absmax, int64_t g) {
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  double a2;
  std::memcpy(&a2, absmax + 2 * g, sizeof a2);
  return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(a2))));
}

template <bool kHalf>
__attribute__((target("avx512f"))) inline __m512 load_x(const float* p) {
  return kHalf ? _mm512_maskz_loadu_ps(0x00ff, p) : _mm512_loadu_ps(p);
}

// One 64-byte group of codes (v; lanes 0-7 only, a block of 64, for kHalf) against x's phases at
// x + m * ldx + r * per, scaled by s, into acc.
template <int M, bool kHalf>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void nf4_group(__m512 table, __m512i v, __m512 s, const float* xs, int64_t ldx,
                                                                           __m512* acc) {
  constexpr int64_t per = (kHalf ? 64 : kNf4Group) / kNf4Phases;
  __m512 w[8];
  w[0] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  w[1] = _mm512_permutexvar_ps(v, table);
  w[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), table);
  w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), table);
  w[4] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), table);
  w[5] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), table);
  w[6] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), table);
  w[7] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), table);
  for (int m = 0; m < M; ++m) {
    const float* x = xs + m * ldx;
    __m512 p0 = _mm512_mul_ps(w[0], load_x<kHalf>(x));
    __m512 p1 = _mm512_mul_ps(w[1], load_x<kHalf>(x + per));
    for (int r = 2; r < 8; r += 2) {
      p0 = _mm512_fmadd_ps(w[r], load_x<kHalf>(x + r * per), p0);
      p1 = _mm512_fmadd_ps(w[r + 1], load_x<kHalf>(x + (r + 1) * per), p1);
    }
    acc[m] = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), s, acc[m]);
  }
}

// out[m] = sum_k W[k] x[m, k] for one NF4 row against x split in groups of 128 (kNf4Phases phases).
// 64 code bytes at a time: their 16 dwords hold 8 nibbles each, and vpermps looks up the low 4 bits of
// each lane, so 8 shifts and 8 permutes give the 8 phases without widening a byte: lane i, phase r is
// element 8i + r (byte r / 2 of the dword, its high nibble for even r). Lanes 0-7 are one block of 64,
// lanes 8-15 the next, each scaled by its absmax. A last half group (K % 128 == 64) runs with lanes
// 8-15 masked off.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void nf4_dot_avx512(const uint8_t* codes, const float* absmax, const float* xs, int64_t ldx,
                                                                         int64_t K, float* out) {
  const __m512 table = _mm512_loadu_ps(kNf4Codes);
  const int64_t pf = prefetch_bytes();
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t full = K / kNf4Group;
  for (int64_t g = 0; g < full; ++g) {
    nf4_prefetch_group(pf, codes, absmax, g);
    nf4_group<M, false>(table, _mm512_loadu_si512(codes + g * 64), nf4_pair_scale(absmax, g), xs + g * kNf4Group, ldx, acc);
  }
  if (K % kNf4Group != 0) {  // one block of 64 left
    const __m512i v = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + full * 64)));
    nf4_group<M, true>(table, v, _mm512_set1_ps(absmax[2 * full]), xs + full * kNf4Group, ldx, acc);
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}

template <bool kHalf>
__attribute__((target("avx512f,avx512bw"))) inline __m512i load_xb(const uint16_t* p) {
  return kHalf ? _mm512_maskz_loadu_epi16(0xffff, p) : _mm512_loadu_si512(p);
}

// 32 floats at p times inv, rounded to the nearest (even) integer, as int16 words.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512i i16_words32(const float* p, __m512 inv) {
  const __m512i lo = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p), inv)), hi = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p + 16), inv));
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo)), _mm512_cvtepi32_epi16(hi), 1);
}

// split_for_rows_i16 under AVX-512: a group's largest |x|, its 128 elements times 16383 over it
// rounded to int16 (cvtps2dq: to nearest even) in four registers, each phase gathered from them by
// two two-register word permutes (its first 16 words from elements 0-63, the rest 64-127).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void split_i16_avx512(const float* x, int64_t M, int64_t K, uint16_t* xw, float* scales) {
  alignas(64) uint16_t idx[4][32];
  for (int q = 0; q < 4; ++q)
    for (int w = 0; w < 32; ++w) idx[q][w] = static_cast<uint16_t>((8 * (w / 2) + 4 * (w % 2) + (q ^ 1)) % 64);
  const int64_t groups = (K + kNf4Group - 1) / kNf4Group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g0 = 0; g0 < K; g0 += kNf4Group) {
      const int64_t n = std::min(kNf4Group, K - g0), per = n / 4;
      const float* xr = x + m * K + g0;
      __m512 mx = _mm512_setzero_ps();
      __mmask16 nan = 0;
      for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(xr + i);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      }
      const float amax = _mm512_reduce_max_ps(mx);
      const __m512 inv = _mm512_set1_ps(amax > 0 ? kI16XMax / amax : 0.0f);
      scales[m * groups + g0 / kNf4Group] = nan ? std::numeric_limits<float>::quiet_NaN() : amax / kI16XMax / kI16CodeOne;
      __m512i in[4];
      for (int h = 0; h < 4; ++h) in[h] = i16_words32(xr + (32 * h < n ? 32 * h : 0), inv);  // a half group: in[2], in[3] unused
      for (int q = 0; q < 4; ++q) {
        const __m512i ix = _mm512_load_si512(idx[q]);
        const __m512i lo = _mm512_permutex2var_epi16(in[0], ix, in[1]);
        if (n == kNf4Group) {
          const __m512i hi = _mm512_permutex2var_epi16(in[2], ix, in[3]);
          _mm512_storeu_si512(xw + m * K + g0 + q * per, _mm512_mask_blend_epi16(0xffff0000u, lo, hi));
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(xw + m * K + g0 + q * per), _mm512_castsi512_si256(lo));
        }
      }
    }
}

// The int16 NF4 dot: a 64-byte group of codes read as 32 words of four nibbles each (word i: bits
// 7-4 element 4i, 3-0 4i + 1, 15-12 4i + 2, 11-8 4i + 3). Shifted by 4q bits, vpermw looks up each
// word's low five bits in the 16 int16 code values (kNf4CodesI16) written twice (the fifth bit, a
// neighbour's, picks the same value), so four shifts-and-permutes give the group's 128 weights;
// vpdpwssd sums word pairs 2j, 2j + 1 (elements 8j + p, 8j + 4 + p) times x's into int32 lane j
// (exact: at most 8 products of 4096 x 16383 a lane a group): lanes 0-7 one block of 64, lanes 8-15
// the next. Their sums, converted to float, are scaled by the blocks' absmax times x's group scale.
// A last half group: words 16-31 masked off.
template <int M, bool kHalf>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) inline void nf4_group_i16(__m512i table, __m512i v, __m512 s, const uint16_t* xq,
                                                                                        int64_t ldx, const float* xs, int64_t lds, __m512* acc) {
  constexpr int64_t per = (kHalf ? 64 : kNf4Group) / 4;  // words a phase
  const __m512i w[4] = {_mm512_permutexvar_epi16(v, table), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table),
                        _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table)};
  for (int m = 0; m < M; ++m) {
    const uint16_t* x = xq + m * ldx;
    __m512i t0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w[0], load_xb<kHalf>(x));
    __m512i t1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w[2], load_xb<kHalf>(x + 2 * per));
    t0 = _mm512_dpwssd_epi32(t0, w[1], load_xb<kHalf>(x + per));
    t1 = _mm512_dpwssd_epi32(t1, w[3], load_xb<kHalf>(x + 3 * per));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)), _mm512_mul_ps(s, _mm512_set1_ps(xs[m * lds])), acc[m]);
  }
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void nf4_dot_i16_avx512(const uint8_t* codes, const float* absmax, const int16_t* xq,
                                                                                       const float* scales, int64_t ldx, int64_t K, float* out) {
  struct Table {
    alignas(64) int16_t v[32];
    Table() {
      for (int i = 0; i < 32; ++i) v[i] = kNf4CodesI16[i & 15];
    }
  };
  static const Table tv;
  const __m512i table = _mm512_load_si512(tv.v);
  const uint16_t* xw = reinterpret_cast<const uint16_t*>(xq);
  const int64_t groups = (K + kNf4Group - 1) / kNf4Group;
  const int64_t pf = prefetch_bytes();
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t full = K / kNf4Group;
  for (int64_t g = 0; g < full; ++g) {
    nf4_prefetch_group(pf, codes, absmax, g);
    nf4_group_i16<M, false>(table, _mm512_loadu_si512(codes + g * 64), nf4_pair_scale(absmax, g), xw + g * kNf4Group, ldx, scales + g, groups, acc);
  }
  if (K % kNf4Group != 0) {
    const __m512i v = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + full * 64)));
    nf4_group_i16<M, true>(table, v, _mm512_set1_ps(absmax[2 * full]), xw + full * kNf4Group, ldx, scales + full, groups, acc);
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
}

// out[m] = sum_k W[k] x[m, k] for one BF16 row against x split in groups of 32 (even then odd
// elements): a 64-byte load holds 32 weights, the even ones in each dword's low half (shifted up 16
// bits: the float) and the odd ones in its high half (masked: the float).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void bf16_dot_avx512(const uint16_t* w, const float* xs, int64_t ldx, int64_t K, float* out) {
  const int64_t pf = prefetch_bytes();
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int64_t full = K / kBf16Group;
  for (int64_t g = 0; g < full; ++g) {
    if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(w + g * kBf16Group) + pf, _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(w + g * kBf16Group);
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    for (int m = 0; m < M; ++m) {
      const float* x = xs + m * ldx + g * kBf16Group;
      acc[m][0] = _mm512_fmadd_ps(even, _mm512_loadu_ps(x), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + 16), acc[m][1]);
    }
  }
  for (int m = 0; m < M; ++m) {
    float t = 0.0f;
    for (int64_t k = full * kBf16Group; k < K; ++k) t += bf16_to_f32(w[k]) * xs[m * ldx + k];
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + t;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void nf4_row_avx512(const uint8_t* codes, const float* absmax, float* dst, int64_t n) {
  const __m512 table = _mm512_loadu_ps(kNf4Codes);
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t b = 0; b < n / 64; ++b) {
    const __m512 a = _mm512_set1_ps(absmax[b]);
    for (int h = 0; h < 2; ++h) {
      __m512 even, odd;
      nf4_decode16(codes + b * 32 + h * 16, table, even, odd);
      even = _mm512_mul_ps(even, a);
      odd = _mm512_mul_ps(odd, a);
      float* d = dst + b * 64 + h * 32;
      _mm512_storeu_ps(d, _mm512_permutex2var_ps(even, lo_idx, odd));
      _mm512_storeu_ps(d + 16, _mm512_permutex2var_ps(even, hi_idx, odd));
    }
  }
}

// Four accumulators a row: one FMA chain held the int8 product to a quarter of the FMA rate.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void q8_dot_avx512(const int8_t* q, float scale, const float* x, int64_t ldx, int64_t K,
                                                                        float* out) {
  const int64_t pf = prefetch_bytes();
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(q + k + pf), _MM_HINT_T0);
    for (int u = 0; u < 4; ++u) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k + 16 * u))));
      for (int m = 0; m < M; ++m) acc[m][u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * ldx + k + 16 * u), acc[m][u]);
    }
  }
  for (; k < K; k += 16) {
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
    for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < M; ++m)
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]))) * scale;
}

// AVX2 + FMA forms of the BF16 and int8 row kernels, for CPUs without AVX-512 (most desktop parts:
// there the portable loops decoded 1.4-1.7 tok/s of the quick start's model). Same x layout: a
// group's 32 BF16 weights are two 32-byte loads, each 8 even (shifted up) and 8 odd (masked) floats.
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <int M>
__attribute__((target("avx2,fma"))) void bf16_dot_avx2(const uint16_t* w, const float* xs, int64_t ldx, int64_t K, float* out) {
  const int64_t pf = prefetch_bytes();
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_ps();
  const int64_t full = K / kBf16Group;
  for (int64_t g = 0; g < full; ++g) {
    if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(w + g * kBf16Group) + pf, _MM_HINT_T0);
    for (int h = 0; h < 2; ++h) {  // weights 16h .. 16h + 15: even ones x[8h ..], odd ones x[16 + 8h ..]
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * kBf16Group + 16 * h));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
      for (int m = 0; m < M; ++m) {
        const float* x = xs + m * ldx + g * kBf16Group;
        acc[m][2 * h] = _mm256_fmadd_ps(even, _mm256_loadu_ps(x + 8 * h), acc[m][2 * h]);
        acc[m][2 * h + 1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(x + 16 + 8 * h), acc[m][2 * h + 1]);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    float t = 0.0f;
    for (int64_t k = full * kBf16Group; k < K; ++k) t += bf16_to_f32(w[k]) * xs[m * ldx + k];
    out[m] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]))) + t;
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void q8_dot_avx2(const int8_t* q, float scale, const float* x, int64_t ldx, int64_t K, float* out) {
  const int64_t pf = prefetch_bytes();
  __m256 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (pf > 0) _mm_prefetch(reinterpret_cast<const char*>(q + k + pf), _MM_HINT_T0);
    for (int u = 0; u < 4; ++u) {
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k + 8 * u))));
      for (int m = 0; m < M; ++m) acc[m][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + k + 8 * u), acc[m][u]);
    }
  }
  for (int m = 0; m < M; ++m) {
    float t = 0.0f;
    for (int64_t j = k; j < K; ++j) t += static_cast<float>(q[j]) * x[m * ldx + j];
    out[m] = (hsum256(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]))) + t) * scale;
  }
}

// NF4 with AVX2: nf4_dot_avx512's group as two halves of 8 dwords (one block of 64 each, x's phases
// at lanes 0-7 and 8-15). The 16-entry table is two 8-entry permutes blended on the nibble's bit 3.
__attribute__((target("avx2,fma"))) inline __m256 nf4_lookup8(__m256 tlo, __m256 thi, __m256i idx) {
  const __m256 lo = _mm256_permutevar8x32_ps(tlo, idx), hi = _mm256_permutevar8x32_ps(thi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// 8 dwords of codes (v: 64 weights, lane i's phase r is element 8i + r) against x's phases at
// x0 + m * ldx + r * per, scaled by `scale`, into acc.
template <int M>
__attribute__((target("avx2,fma"))) inline void nf4_half_avx2(__m256 tlo, __m256 thi, __m256i v, float scale, const float* x0, int64_t ldx,
                                                             int64_t per, __m256* acc) {
  __m256 w[8];
  for (int r = 0; r < 8; ++r) w[r] = nf4_lookup8(tlo, thi, _mm256_srl_epi32(v, _mm_cvtsi32_si128(8 * (r / 2) + (r % 2 == 0 ? 4 : 0))));
  const __m256 s = _mm256_set1_ps(scale);
  for (int m = 0; m < M; ++m) {
    const float* x = x0 + m * ldx;
    __m256 p0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
    __m256 p1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(x + per));
    for (int r = 2; r < 8; r += 2) {
      p0 = _mm256_fmadd_ps(w[r], _mm256_loadu_ps(x + r * per), p0);
      p1 = _mm256_fmadd_ps(w[r + 1], _mm256_loadu_ps(x + (r + 1) * per), p1);
    }
    acc[m] = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), s, acc[m]);
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void nf4_dot_avx2(const uint8_t* codes, const float* absmax, const float* xs, int64_t ldx, int64_t K,
                                                      float* out) {
  const __m256 tlo = _mm256_loadu_ps(kNf4Codes), thi = _mm256_loadu_ps(kNf4Codes + 8);
  const int64_t pf = prefetch_bytes();
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  const int64_t full = K / kNf4Group, per = kNf4Group / kNf4Phases;
  for (int64_t g = 0; g < full; ++g) {
    nf4_prefetch_group(pf, codes, absmax, g);
    const float* x = xs + g * kNf4Group;
    for (int h = 0; h < 2; ++h)
      nf4_half_avx2<M>(tlo, thi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 64 + 32 * h)), absmax[2 * g + h], x + 8 * h, ldx,
                       per, acc);
  }
  if (K % kNf4Group != 0)  // one block of 64 left: phases of 8
    nf4_half_avx2<M>(tlo, thi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + full * 64)), absmax[2 * full], xs + full * kNf4Group, ldx,
                     64 / kNf4Phases, acc);
  for (int m = 0; m < M; ++m) out[m] = hsum256(acc[m]);
}

// The int16 NF4 dot with AVX2 (no VNNI, no vpermw): nf4_dot_i16_avx512's group as two halves of 16
// words (one block of 64 each). A phase's 16 code values are looked up by two byte shuffles, one for
// the int16 values' low bytes and one for their high bytes (an index byte with bit 7 set gives 0), and
// vpmaddwd sums word pairs into 8 int32 lanes, exact as there (at most 8 products a lane a block).
template <int M, int64_t kPer>
__attribute__((target("avx2,fma"))) inline void nf4_half_i16_avx2(__m256i tlo, __m256i thi, __m256i v, float absmax, const uint16_t* xq, int64_t ldx,
                                                                 const float* xs, int64_t lds, __m256* acc) {
  const __m256i nib = _mm256_set1_epi16(0x000f), zero_hi = _mm256_set1_epi16(static_cast<short>(0x8000)), zero_lo = _mm256_set1_epi16(0x0080);
  __m256i w[4];
  for (int q = 0; q < 4; ++q) {
    const __m256i idx = _mm256_and_si256(_mm256_srli_epi16(v, 4 * q), nib);
    w[q] = _mm256_or_si256(_mm256_shuffle_epi8(tlo, _mm256_or_si256(idx, zero_hi)),
                           _mm256_shuffle_epi8(thi, _mm256_or_si256(_mm256_slli_epi16(idx, 8), zero_lo)));
  }
  for (int m = 0; m < M; ++m) {
    const __m256i* x = reinterpret_cast<const __m256i*>(xq + m * ldx);
    constexpr int64_t s = kPer / 16;  // a phase's stride in 16-word vectors
    __m256i t0 = _mm256_madd_epi16(w[0], _mm256_loadu_si256(x));
    __m256i t1 = _mm256_madd_epi16(w[2], _mm256_loadu_si256(x + 2 * s));
    t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(w[1], _mm256_loadu_si256(x + s)));
    t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(w[3], _mm256_loadu_si256(x + 3 * s)));
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(t0, t1)), _mm256_set1_ps(absmax * xs[m * lds]), acc[m]);
  }
}

template <int M>
__attribute__((target("avx2,fma"))) void nf4_dot_i16_avx2(const uint8_t* codes, const float* absmax, const int16_t* xq, const float* scales,
                                                          int64_t ldx, int64_t K, float* out) {
  struct Tables {
    alignas(32) uint8_t lo[32], hi[32];
    Tables() {
      for (int i = 0; i < 32; ++i) {
        lo[i] = static_cast<uint8_t>(static_cast<uint16_t>(kNf4CodesI16[i & 15]) & 0xff);
        hi[i] = static_cast<uint8_t>(static_cast<uint16_t>(kNf4CodesI16[i & 15]) >> 8);
      }
    }
  };
  static const Tables tv;
  const __m256i tlo = _mm256_load_si256(reinterpret_cast<const __m256i*>(tv.lo)), thi = _mm256_load_si256(reinterpret_cast<const __m256i*>(tv.hi));
  const uint16_t* xw = reinterpret_cast<const uint16_t*>(xq);
  const int64_t groups = (K + kNf4Group - 1) / kNf4Group, full = K / kNf4Group;
  const int64_t pf = prefetch_bytes();
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < full; ++g) {
    nf4_prefetch_group(pf, codes, absmax, g);
    for (int h = 0; h < 2; ++h)
      nf4_half_i16_avx2<M, kNf4Group / 4>(tlo, thi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + g * 64 + 32 * h)), absmax[2 * g + h],
                                          xw + g * kNf4Group + 16 * h, ldx, scales + g, groups, acc);
  }
  if (K % kNf4Group != 0)  // a last block of 64: phases of 16 words
    nf4_half_i16_avx2<M, 16>(tlo, thi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + full * 64)), absmax[2 * full],
                             xw + full * kNf4Group, ldx, scales + full, groups, acc);
  for (int m = 0; m < M; ++m) out[m] = hsum256(acc[m]);
}

// NF4 codes to floats (prefill's dequantised rows) with AVX2: 8 code bytes, their high and low nibbles
// looked up, interleaved back into element order, times the block's absmax (as dequantize_nf4).
__attribute__((target("avx2,fma"))) void nf4_row_avx2(const uint8_t* codes, const float* absmax, float* dst, int64_t n) {
  const __m256 tlo = _mm256_loadu_ps(kNf4Codes), thi = _mm256_loadu_ps(kNf4Codes + 8);
  const int64_t full = n / 64 * 64;
  for (int64_t i = 0; i < full; i += 16) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2)));
    const __m256 a = _mm256_set1_ps(absmax[i / 64]);
    const __m256 hi = _mm256_mul_ps(nf4_lookup8(tlo, thi, _mm256_srli_epi32(v, 4)), a);  // elements i, i + 2, ...
    const __m256 lo = _mm256_mul_ps(nf4_lookup8(tlo, thi, v), a);                        // elements i + 1, i + 3, ...
    const __m256 u0 = _mm256_unpacklo_ps(hi, lo), u1 = _mm256_unpackhi_ps(hi, lo);
    _mm256_storeu_ps(dst + i, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(dst + i + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
  }
  if (full < n) dequantize_nf4(codes + full / 2, absmax + full / 64, n - full, dst + full);
}

// Calls f(std::integral_constant<int, M>{}) for the row counts the AVX-512 kernels are built for
// (1-3) and returns true; false for any other M.
template <typename F>
bool with_rows(int64_t M, F&& f) {
  switch (M) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    default: return false;
  }
}
#endif

}  // namespace

void nf4_to_f32_row(const uint8_t* codes, const float* absmax, float* dst, int64_t n) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_avx512()) return nf4_row_avx512(codes, absmax, dst, n);
  if (have_avx2()) return nf4_row_avx2(codes, absmax, dst, n);
#endif
  dequantize_nf4(codes, absmax, n, dst);
}

void split_for_rows(DType w, const float* x, int64_t M, int64_t K, float* xs) {
  FERRY_CHECK(is_nf4(w) || w == DType::kBF16);
  for (int64_t m = 0; m < M; ++m) {
    if (is_nf4(w)) split_phases_row(x + m * K, K, kNf4Group, kNf4Phases, 64, xs + m * K);
    else split_phases_row(x + m * K, K, kBf16Group, kBf16Phases, 0, xs + m * K);
  }
}

void nf4_dot_rows(const uint8_t* codes, const float* absmax, const float* xs, int64_t ldx, int64_t K, int64_t M, float* out) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_avx512() && with_rows(M, [&](auto m) { nf4_dot_avx512<m()>(codes, absmax, xs, ldx, K, out); })) return;
  if (have_avx2() && with_rows(M, [&](auto m) { nf4_dot_avx2<m()>(codes, absmax, xs, ldx, K, out); })) return;
#endif
  for (int64_t m = 0; m < M; ++m) out[m] = nf4_dot_portable(codes, absmax, xs + m * ldx, K);
}

namespace {
// d, or the next exact kernel where the CPU lacks it.
Nf4Dot available(Nf4Dot d) { return d == Nf4Dot::kI16 && !have_vnni() && !have_avx2() ? Nf4Dot::kF32 : d; }
std::atomic<int> g_nf4_dot{-1};  // set_nf4_decode_dot's choice, -1 before one
}  // namespace

Nf4Dot nf4_decode_dot() {
  // The int16 kernel where the CPU has AVX512_VNNI (Ice Lake and later Xeons, Zen 4 and 5) or AVX2
  // (its AVX2 form: a 2-core AMD EPYC without AVX-512 read a Llama-3-70B NF4 layer in 42-51 ms against
  // the float32 kernel's 81-82, notes/cpu.md). One core
  // (bench_cpu_mix, notes/cpu.md): on the H200 host's Xeon its loop took 5.3 ns a 64 bytes of codes
  // against the float32 kernel's 6.0, on a Zen 5 core 1.35 against 2.0. A vdpbf16ps kernel (BF16
  // code values and x) was as fast on Zen 5 but slower than float32 on the Xeon, and less precise; an
  // int8 one (vpermb, vpdpbusd) 37% faster a group on the Xeon, no faster beside the copies and far
  // less precise (notes/cpu.md, ninth session).
  const int set = g_nf4_dot.load(std::memory_order_relaxed);
  if (set >= 0) return static_cast<Nf4Dot>(set);
  static const Nf4Dot d = [] {
    const char* e = std::getenv("FERRY_CPU_NF4_DOT");
    const std::string want = e ? e : "";
    if (!want.empty() && want != "f32" && want != "i16")
      std::fprintf(stderr, "ferry: FERRY_CPU_NF4_DOT=%s is neither f32 nor i16; using the default\n", want.c_str());
    return available(want == "f32" ? Nf4Dot::kF32 : Nf4Dot::kI16);
  }();
  return d;
}

Nf4Dot set_nf4_decode_dot(Nf4Dot d) {
  d = available(d);
  g_nf4_dot.store(static_cast<int>(d), std::memory_order_relaxed);
  return d;
}

const char* nf4_dot_name(Nf4Dot d) { return d == Nf4Dot::kI16 ? "i16" : "f32"; }

void split_for_rows_i16(const float* x, int64_t M, int64_t K, int16_t* xq, float* scales) {
  FERRY_CHECK(K % 64 == 0);
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_avx512()) return split_i16_avx512(x, M, K, reinterpret_cast<uint16_t*>(xq), scales);
#endif
  const int64_t groups = (K + kNf4Group - 1) / kNf4Group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g0 = 0; g0 < K; g0 += kNf4Group) {
      const int64_t n = std::min(kNf4Group, K - g0), per = n / 4;
      const float* xr = x + m * K + g0;
      float amax = 0;
      bool nan = false;
      for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xr[i])), nan = nan || std::isnan(xr[i]);
      const float inv = amax > 0 ? kI16XMax / amax : 0.0f;
      scales[m * groups + g0 / kNf4Group] = nan ? std::numeric_limits<float>::quiet_NaN() : amax / kI16XMax / kI16CodeOne;
      int16_t* d = xq + m * K + g0;
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t j = 0; j < n / 8; ++j)
          for (int64_t h = 0; h < 2; ++h) d[q * per + 2 * j + h] = static_cast<int16_t>(std::nearbyint(xr[8 * j + 4 * h + (q ^ 1)] * inv));
    }
}

void nf4_dot_rows_i16(const uint8_t* codes, const float* absmax, const int16_t* xq, const float* scales, int64_t ldx, int64_t K, int64_t M, float* out) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_vnni() && with_rows(M, [&](auto m) { nf4_dot_i16_avx512<m()>(codes, absmax, xq, scales, ldx, K, out); })) return;
  if (have_avx2() && with_rows(M, [&](auto m) { nf4_dot_i16_avx2<m()>(codes, absmax, xq, scales, ldx, K, out); })) return;
#endif
  const int64_t groups = (K + kNf4Group - 1) / kNf4Group;
  for (int64_t m = 0; m < M; ++m) {
    float acc = 0.0f;
    for (int64_t b = 0; b < K / 64; ++b) {
      const int64_t g0 = b / 2 * kNf4Group, n = std::min<int64_t>(kNf4Group, K - g0);
      int64_t part = 0;  // 64 products of up to 4096 x 16383: more than int32 holds
      for (int64_t e = b * 64; e < b * 64 + 64; ++e) {
        const int64_t r = e - g0, at = ((r % 4) ^ 1) * (n / 4) + 2 * (r / 8) + (r / 4) % 2;
        const uint8_t c = codes[e / 2];
        part += kNf4CodesI16[e % 2 == 0 ? c >> 4 : c & 0x0f] * xq[m * ldx + g0 + at];
      }
      acc += static_cast<float>(part) * (absmax[b] * scales[m * groups + b / 2]);
    }
    out[m] = acc;
  }
}

void bf16_dot_rows(const uint16_t* w, const float* xs, int64_t ldx, int64_t K, int64_t M, float* out) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_avx512() && with_rows(M, [&](auto m) { bf16_dot_avx512<m()>(w, xs, ldx, K, out); })) return;
  if (have_avx2() && with_rows(M, [&](auto m) { bf16_dot_avx2<m()>(w, xs, ldx, K, out); })) return;
#endif
  for (int64_t m = 0; m < M; ++m) out[m] = bf16_dot_portable(w, xs + m * ldx, K);
}

void q8_dot_rows(const int8_t* q, float scale, const float* x, int64_t ldx, int64_t K, int64_t M, float* out) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_avx512() && K % 16 == 0 && with_rows(M, [&](auto m) { q8_dot_avx512<m()>(q, scale, x, ldx, K, out); })) return;
  if (have_avx2() && with_rows(M, [&](auto m) { q8_dot_avx2<m()>(q, scale, x, ldx, K, out); })) return;
#endif
  for (int64_t m = 0; m < M; ++m) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(q[k]) * x[m * ldx + k];
    out[m] = acc * scale;
  }
}

const char* simd_level() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
#endif
  return "baseline";
}

}  // namespace ferry::cpu
