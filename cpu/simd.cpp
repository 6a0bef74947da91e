#include "cpu/simd.h"

#include <cstring>

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

bool have_avx512() {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return yes;
#else
  return false;
#endif
}

// The portable NF4 dot (where AVX-512 is missing): out = sum_j code_hi(j) xe[j] + code_lo(j) xo[j],
// each block of 32 bytes scaled by its absmax.
float nf4_dot_portable(const uint8_t* codes, const float* absmax, const float* xe, const float* xo, int64_t K) {
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 64; ++b) {
    float part = 0.0f;
    for (int64_t j = b * 32; j < b * 32 + 32; ++j) part += kNf4Codes[codes[j] >> 4] * xe[j] + kNf4Codes[codes[j] & 0x0f] * xo[j];
    acc += part * absmax[b];
  }
  return acc;
}

#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
// 16 codes (one byte each holding two) -> the 32 weights' values without their block scale: the high
// nibbles (even elements) and the low nibbles (odd elements), each a 16-entry permute of the table.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void nf4_decode16(const uint8_t* codes, __m512 table, __m512& even, __m512& odd) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  odd = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0f)), table);
}

// out[m] = sum_k W[k] x[m, k] for one NF4 row; xe / xo: x's even / odd elements (x deinterleaved once
// for all rows of the weight), [M, ldx].
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void nf4_dot_avx512(const uint8_t* codes, const float* absmax, const float* xe, const float* xo,
                                                                         int64_t ldx, int64_t K, float* out) {
  const __m512 table = _mm512_loadu_ps(kNf4Codes);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 64; ++b) {
    __m512 part[M];
    for (int m = 0; m < M; ++m) part[m] = _mm512_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      __m512 even, odd;
      nf4_decode16(codes + b * 32 + h * 16, table, even, odd);
      const int64_t j = b * 32 + h * 16;
      for (int m = 0; m < M; ++m) {
        part[m] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xe + m * ldx + j), part[m]);
        part[m] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xo + m * ldx + j), part[m]);
      }
    }
    const __m512 a = _mm512_set1_ps(absmax[b]);
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(part[m], a, acc[m]);
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
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

template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void q8_dot_avx512(const int8_t* q, float scale, const float* x, int64_t ldx, int64_t K,
                                                                        float* out) {
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k))));
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * ldx + k), acc[m]);
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_reduce_add_ps(acc[m]) * scale;
}
#endif

}  // namespace

void nf4_to_f32_row(const uint8_t* codes, const float* absmax, float* dst, int64_t n) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_avx512()) return nf4_row_avx512(codes, absmax, dst, n);
#endif
  dequantize_nf4(codes, absmax, n, dst);
}

void nf4_dot_rows(const uint8_t* codes, const float* absmax, const float* xe, const float* xo, int64_t ldh, int64_t K, int64_t M, float* out) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_avx512()) {
    switch (M) {
      case 1: return nf4_dot_avx512<1>(codes, absmax, xe, xo, ldh, K, out);
      case 2: return nf4_dot_avx512<2>(codes, absmax, xe, xo, ldh, K, out);
      case 3: return nf4_dot_avx512<3>(codes, absmax, xe, xo, ldh, K, out);
      default: break;
    }
  }
#endif
  for (int64_t m = 0; m < M; ++m) out[m] = nf4_dot_portable(codes, absmax, xe + m * ldh, xo + m * ldh, K);
}

void q8_dot_rows(const int8_t* q, float scale, const float* x, int64_t ldx, int64_t K, int64_t M, float* out) {
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
  if (have_avx512() && K % 16 == 0) {
    switch (M) {
      case 1: return q8_dot_avx512<1>(q, scale, x, ldx, K, out);
      case 2: return q8_dot_avx512<2>(q, scale, x, ldx, K, out);
      case 3: return q8_dot_avx512<3>(q, scale, x, ldx, K, out);
      default: break;
    }
  }
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
