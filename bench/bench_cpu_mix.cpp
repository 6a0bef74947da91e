// bench_cpu_mix: what one core of this CPU does per cycle with the instructions the NF4 row kernels
// are made of (cpu/simd.cpp), each on data in L1 so that memory plays no part:
//   - single instructions, eight independent chains (throughput) and one chain (latency);
//   - the loop bodies of the NF4 decode kernels for one group of 64 code bytes (M = 1), which say
//     whether a kernel is bound by its instructions: ferry's float32 and int16 (vpdpwssd) kernels,
//     and a vdpbf16ps one (BF16 code values and x) measured and not kept;
//   - on CPUs with AMX, the tile products a GEMV would need for 16 rows x 128 elements (decoding into
//     A tiles, 4 TDPBF16PS), which shows why ferry's decode GEMV does not use AMX.
// x86-64 with AVX-512 BF16 only (elsewhere it says so and exits 0). The figures are ns; cycles need
// the clock, which `fma x8` gives (two FMA pipes: 0.5 cycle an instruction).
//
//   bench_cpu_mix
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

#if defined(__x86_64__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FERRY_MIX __attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

alignas(64) uint8_t g_codes[16][8192];
alignas(64) float g_xf[8192];
alignas(64) uint16_t g_xb[8192];
alignas(64) float g_absmax[8192];

template <typename F>
void report(const char* name, double per, const char* unit, F&& f) {
  const long n = 20000000;
  f(n / 10);  // warm-up
  const auto t0 = std::chrono::steady_clock::now();
  f(n);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("| %s | %.3f ns %s |\n", name, s * 1e9 / (static_cast<double>(n) * per), unit);
  std::fflush(stdout);
}

volatile float g_sink;
__attribute__((target("avx512f"))) inline void sink(__m512 v) { g_sink = _mm512_cvtss_f32(v); }
__attribute__((target("avx512f"))) inline void sink(__m512i v) { g_sink = static_cast<float>(_mm512_cvtsi512_si32(v)); }

// A register the compiler cannot see into (so it folds nothing).
template <typename V>
__attribute__((target("avx512f"))) inline V opaque(V v) {
  asm volatile("" : "+v"(v));
  return v;
}

#define EIGHT(OP) OP(a0) OP(a1) OP(a2) OP(a3) OP(a4) OP(a5) OP(a6) OP(a7)
FERRY_MIX void permw8(long n) {
  const __m512i t = opaque(_mm512_set1_epi16(3));
  __m512i a0 = t, a1 = t, a2 = t, a3 = t, a4 = t, a5 = t, a6 = t, a7 = t;
#define OP(a) a = opaque(_mm512_permutexvar_epi16(a, t));
  for (long i = 0; i < n; ++i) { EIGHT(OP) }
#undef OP
  sink(a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7);
}
FERRY_MIX void permps8(long n) {
  const __m512i t = opaque(_mm512_set1_epi32(3));
  __m512 a0 = _mm512_set1_ps(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
#define OP(a) a = opaque(_mm512_permutexvar_ps(t, a));
  for (long i = 0; i < n; ++i) { EIGHT(OP) }
#undef OP
  sink(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7);
}
FERRY_MIX void shift8(long n) {
  const __m512i t = opaque(_mm512_set1_epi32(-1));
  __m512i a0 = t, a1 = t, a2 = t, a3 = t, a4 = t, a5 = t, a6 = t, a7 = t;
#define OP(a) a = opaque(_mm512_srli_epi32(a, 4));
  for (long i = 0; i < n; ++i) { EIGHT(OP) }
#undef OP
  sink(a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7);
}
FERRY_MIX void fma8(long n) {
  const __m512 x = opaque(_mm512_set1_ps(0.999f));
  __m512 a0 = _mm512_set1_ps(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
#define OP(a) a = opaque(_mm512_fmadd_ps(a, x, x));
  for (long i = 0; i < n; ++i) { EIGHT(OP) }
#undef OP
  sink(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7);
}
FERRY_MIX void dp8(long n) {
  const __m512bh x = (__m512bh)opaque(_mm512_set1_epi16(0x3f80));
  __m512 a0 = _mm512_set1_ps(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
#define OP(a) a = opaque(_mm512_dpbf16_ps(a, x, x));
  for (long i = 0; i < n; ++i) { EIGHT(OP) }
#undef OP
  sink(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7);
}
__attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512vnni"))) void dpwssd8(long n) {
  const __m512i x = opaque(_mm512_set1_epi16(3));
  __m512i a0 = x, a1 = x, a2 = x, a3 = x, a4 = x, a5 = x, a6 = x, a7 = x;
#define OP(a) a = opaque(_mm512_dpwssd_epi32(a, x, x));
  for (long i = 0; i < n; ++i) { EIGHT(OP) }
#undef OP
  sink(a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7);
}
FERRY_MIX void dp_chain(long n) {
  const __m512bh x = (__m512bh)opaque(_mm512_set1_epi16(0x3f80));
  __m512 a = _mm512_set1_ps(1);
  for (long i = 0; i < n; ++i) a = _mm512_dpbf16_ps(a, x, x);
  sink(a);
}
FERRY_MIX void permw_dp(long n) {  // 4 vpermw + 4 vdpbf16ps: do they share a port?
  const __m512i t = opaque(_mm512_set1_epi16(3));
  __m512i p0 = t, p1 = t, p2 = t, p3 = t;
  __m512 a0 = _mm512_set1_ps(1), a1 = a0, a2 = a0, a3 = a0;
  for (long i = 0; i < n; ++i) {
    p0 = opaque(_mm512_permutexvar_epi16(p0, t)), p1 = opaque(_mm512_permutexvar_epi16(p1, t));
    p2 = opaque(_mm512_permutexvar_epi16(p2, t)), p3 = opaque(_mm512_permutexvar_epi16(p3, t));
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)t, (__m512bh)t), a1 = _mm512_dpbf16_ps(a1, (__m512bh)t, (__m512bh)t);
    a2 = _mm512_dpbf16_ps(a2, (__m512bh)t, (__m512bh)t), a3 = _mm512_dpbf16_ps(a3, (__m512bh)t, (__m512bh)t);
  }
  sink(a0 + a1 + a2 + a3 + _mm512_castsi512_ps(p0 ^ p1 ^ p2 ^ p3));
}

// The float32 kernel's body (nf4_group<1, false> with its scale), one group of 64 code bytes a step.
FERRY_MIX void group_f32(long n) {
  const __m512 table = _mm512_loadu_ps(g_xf);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
  for (long i = 0; i < n; ++i) {
    const __m512i v = _mm512_load_si512(g_codes[0] + ((i * 64) & 8191));
    __m512 w[8];
    for (int r = 0; r < 8; ++r) w[r] = _mm512_permutexvar_ps(r == 1 ? v : _mm512_srli_epi32(v, 4 * (r ^ 1)), table);
    const float* x = g_xf + ((i * 128) & 4095);
    __m512 p0 = _mm512_mul_ps(w[0], _mm512_loadu_ps(x)), p1 = _mm512_mul_ps(w[1], _mm512_loadu_ps(x + 16));
    for (int r = 2; r < 8; r += 2) {
      p0 = _mm512_fmadd_ps(w[r], _mm512_loadu_ps(x + 16 * r), p0);
      p1 = _mm512_fmadd_ps(w[r + 1], _mm512_loadu_ps(x + 16 * r + 16), p1);
    }
    double a2;
    std::memcpy(&a2, g_absmax + ((2 * i) & 4095), 8);
    const __m512 s = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(a2))));
    if (i & 1) acc1 = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), s, acc1);
    else acc0 = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), s, acc0);
  }
  sink(acc0 + acc1);
}

// A kernel with BF16 code values and x summed by vdpbf16ps (tried; not in ferry: notes/cpu.md).
FERRY_MIX void group_bf16(long n) {
  const __m512i table = _mm512_loadu_si512(g_xb);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 acc = _mm512_setzero_ps();
  for (long i = 0; i < n; ++i) {
    const __m512i v = _mm512_load_si512(g_codes[0] + ((i * 64) & 8191));
    __m512i w[4];
    for (int q = 0; q < 4; ++q) w[q] = _mm512_permutexvar_epi16(q == 0 ? v : _mm512_srli_epi16(v, 4 * q), table);
    const uint16_t* x = g_xb + ((i * 128) & 4095);
    __m512 t0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[0], (__m512bh)_mm512_loadu_si512(x));
    __m512 t1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w[2], (__m512bh)_mm512_loadu_si512(x + 64));
    t0 = _mm512_dpbf16_ps(t0, (__m512bh)w[1], (__m512bh)_mm512_loadu_si512(x + 32));
    t1 = _mm512_dpbf16_ps(t1, (__m512bh)w[3], (__m512bh)_mm512_loadu_si512(x + 96));
    double a2;
    std::memcpy(&a2, g_absmax + ((2 * i) & 4095), 8);
    const __m512 s = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(a2))));
    acc = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), s, acc);
  }
  sink(acc);
}

// The int16 kernel's body (cpu/simd.cpp nf4_group_i16<1, false>): code values as int16 fixed point
// and x as int16 with a scale a group, summed by vpdpwssd (AVX512_VNNI) in int32, then scaled in float.
__attribute__((noinline, target("avx512f,avx512bw,avx512vl,avx512vnni"))) void group_i16(long n) {
  const __m512i table = _mm512_loadu_si512(g_xb);
  const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 acc = _mm512_setzero_ps();
  for (long i = 0; i < n; ++i) {
    const __m512i v = _mm512_load_si512(g_codes[0] + ((i * 64) & 8191));
    __m512i w[4];
    for (int q = 0; q < 4; ++q) w[q] = _mm512_permutexvar_epi16(q == 0 ? v : _mm512_srli_epi16(v, 4 * q), table);
    const uint16_t* x = g_xb + ((i * 128) & 4095);
    __m512i t0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w[0], _mm512_loadu_si512(x));
    __m512i t1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w[2], _mm512_loadu_si512(x + 64));
    t0 = _mm512_dpwssd_epi32(t0, w[1], _mm512_loadu_si512(x + 32));
    t1 = _mm512_dpwssd_epi32(t1, w[3], _mm512_loadu_si512(x + 96));
    double a2;
    std::memcpy(&a2, g_absmax + ((2 * i) & 4095), 8);
    const __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(a2)))),
                                   _mm512_set1_ps(g_xf[i & 4095]));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)), s, acc);
  }
  sink(acc);
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
alignas(64) uint16_t g_abuf[2][4][16][32];
alignas(64) uint16_t g_bt[4][512];
alignas(64) float g_c[16][16];

// 16 rows x 128 elements a step: kDecode decodes the rows' 64 code bytes into four A tiles (vpermw,
// stored); kTiles loads them with four B tiles and runs four TDPBF16PS into one C.
template <bool kDecode, bool kTiles>
__attribute__((noinline, target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl"))) void amx_step(long n) {
  const __m512i table = _mm512_set1_epi16(0x3f80);
  for (long s = 0; s < n; ++s) {
    uint16_t(*ab)[16][32] = g_abuf[s & 1];
    if (kDecode)
      for (int r = 0; r < 16; ++r) {
        const __m512i v = _mm512_load_si512(g_codes[r] + ((s * 64) & 8191));
        for (int q = 0; q < 4; ++q) _mm512_store_si512(ab[q][r], _mm512_permutexvar_epi16(q == 0 ? v : _mm512_srli_epi16(v, 4 * q), table));
      }
    asm volatile("" ::: "memory");
    if (kTiles) {
      _tile_loadd(1, ab[0], 64);
      _tile_loadd(5, g_bt[0], 64);
      _tile_dpbf16ps(0, 1, 5);
      _tile_loadd(2, ab[1], 64);
      _tile_loadd(6, g_bt[1], 64);
      _tile_dpbf16ps(0, 2, 6);
      _tile_loadd(3, ab[2], 64);
      _tile_loadd(7, g_bt[2], 64);
      _tile_dpbf16ps(0, 3, 7);
      _tile_loadd(4, ab[3], 64);
      _tile_loadd(5, g_bt[3], 64);
      _tile_dpbf16ps(0, 4, 5);
    }
    asm volatile("" ::: "memory");
  }
  if (kTiles) _tile_stored(0, g_c, 64);
}

__attribute__((target("amx-tile"))) bool amx_start() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 22) & 1)) return false;
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) return false;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  // Not _tile_loadconfig: GCC 12's declares only 8 bytes read, and the rows and widths are dropped
  // as dead stores (cpu/attention.cpp).
  __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
  return true;
}
__attribute__((target("amx-tile"))) void amx_stop() { _tile_release(); }

}  // namespace

int main() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512bf16")) {
    std::printf("bench_cpu_mix: this CPU has no AVX-512 BF16; nothing to measure\n");
    return 0;
  }
  for (int i = 0; i < 8192; ++i) {
    for (int r = 0; r < 16; ++r) g_codes[r][i] = static_cast<uint8_t>(i * 37 + r);
    g_xf[i] = 0.001f * static_cast<float>(i % 100);
    g_xb[i] = 0x3f80;
    g_absmax[i] = 1.0f;
  }
  std::printf("| one core, data in L1 | time |\n|---|---|\n");
  report("vpermw zmm, 8 chains", 8, "an instruction", permw8);
  report("vpermps zmm, 8 chains", 8, "an instruction", permps8);
  report("vpsrld zmm, 8 chains", 8, "an instruction", shift8);
  report("vfmadd231ps zmm, 8 chains (0.5 cycle with two FMA pipes)", 8, "an instruction", fma8);
  report("vdpbf16ps zmm, 8 chains", 8, "an instruction", dp8);
  report("vdpbf16ps zmm, one chain (latency)", 1, "an instruction", dp_chain);
  if (__builtin_cpu_supports("avx512vnni")) report("vpdpwssd zmm, 8 chains", 8, "an instruction", dpwssd8);
  report("4 vpermw + 4 vdpbf16ps", 8, "an instruction", permw_dp);
  report("NF4 float32 kernel, one group (64 code bytes)", 1, "a group", group_f32);
  report("NF4 vdpbf16ps loop (not kept), one group", 1, "a group", group_bf16);
  if (__builtin_cpu_supports("avx512vnni")) report("NF4 int16 (vpdpwssd) kernel, one group", 1, "a group", group_i16);
  if (amx_start()) {
    report("AMX: decode 16 rows x 64 code bytes into A tiles", 1, "a step", amx_step<true, false>);
    report("AMX: 4 A + 4 B tile loads, 4 TDPBF16PS (one C)", 1, "a step", amx_step<false, true>);
    report("AMX: both", 1, "a step", amx_step<true, true>);
    amx_stop();
  } else {
    std::printf("| AMX | not available |\n");
  }
  return 0;
}
#else
int main() {
  std::printf("bench_cpu_mix: x86-64 only\n");
  return 0;
}
#endif
