// Vector kernels with run-time ISA dispatch: each is compiled for AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and baseline x86-64, and the loader picks the best the CPU supports (GCC
// target_clones / ifunc). The loops are written for the auto-vectoriser (omp simd reductions).
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace ferry::cpu {

// Returns sum(a[i] * b[i]) accumulated in float32.
float dot_f32(const float* a, const float* b, int64_t n);
// out[i] = dynamic_map_signed()[codes[i]] (models/weight_format.h; NF4-DQ's 8-bit absmax codes):
// 64 codes by byte permutes under AVX-512 VBMI (kVbmi), else 16 a gather under AVX-512 (kGather),
// else one at a time (kScalar). kBest picks the first the CPU has; a path it lacks falls back to the
// scalar loop. Returns the path taken (the tests run each).
enum class MapLookup { kBest, kVbmi, kGather, kScalar };
MapLookup dynamic_map_values(const uint8_t* codes, int64_t n, float* out, MapLookup how = MapLookup::kBest);
// NF4-DQ's absmax i0 .. i0 + n - 1 (models/weight_format.h): out[i] = map[codes[i0 + i]] *
// absmax2[(i0 + i) / 256] + means[(i0 + i) / 256], the product and the sum each rounded (the codec's
// values bit for bit).
void nf4dq_absmax(const uint8_t* codes, const float* absmax2, const float* means, int64_t i0, int64_t n, float* out);
// dst[i] = float(src[i]) for bf16 / f16 bit patterns.
void bf16_to_f32_row(const uint16_t* src, float* dst, int64_t n);
void f16_to_f32_row(const uint16_t* src, float* dst, int64_t n);
// dst[i] = f32_to_bf16(src[i]) (round to nearest even; NaN stays NaN), vectorised.
void f32_to_bf16_row(const float* src, uint16_t* dst, int64_t n);
// NF4 (models/weight_format.h) to float: n elements (a multiple of 64) from n / 2 code bytes and
// n / 64 block absmax values; under AVX-512 a 16-entry permute of the code table per 16 codes, else
// the codec's dequantize_nf4.
void nf4_to_f32_row(const uint8_t* codes, const float* absmax, float* dst, int64_t n);
// dst[i] = float(q[i]) * scale.
void q8_to_f32_row(const int8_t* q, float scale, float* dst, int64_t n);
// The decode row kernels read x split into phases: within each group of kNf4Group / kBf16Group
// elements, phase r (elements r, r + P, r + 2P, ...) after phase r - 1, so a weight vector decoded in
// one piece meets its x elements in one load each. A shorter last group is split the same way for NF4
// (a block of 64), and left as it is for BF16. xs: [M, K] like x.
void split_for_rows(DType w, const float* x, int64_t M, int64_t K, float* xs);
inline constexpr int64_t kNf4Group = 128, kNf4Phases = 8;  // 64 code bytes, 8 nibbles a dword
inline constexpr int64_t kBf16Group = 32, kBf16Phases = 2;  // 64 bytes, 2 weights a dword
// The dot of one NF4 weight row (K a multiple of 64) with each of M <= 3 rows of x, split in
// kNf4Group / kNf4Phases (xs: [M, ldx]): out[m].
void nf4_dot_rows(const uint8_t* codes, const float* absmax, const float* xs, int64_t ldx, int64_t K, int64_t M, float* out);
// BF16 inputs (GemmPrecision::kBf16Inputs, the GPU executor's CPU layers): the dot of one NF4 row
// with M <= 3 rows of x, the code values and x rounded to BF16 (as the GPU's tensor-core kernel
// rounds them), each pair of products summed in FP32 by AVX512_BF16's vdpbf16ps: half the vector
// work a weight of the float32 kernel above. xb: x from split_for_rows_bf16 ([M, ldx]). Without
// AVX512_BF16 a scalar loop computes the same sums (slowly: callers ask nf4_bf16_dot_fast() first).
void nf4_dot_rows_bf16(const uint8_t* codes, const float* absmax, const uint16_t* xb, int64_t ldx, int64_t K, int64_t M, float* out);
// x [M, K] (K a multiple of 64) rounded to BF16 in the order nf4_dot_rows_bf16 reads it: in each
// group of 128 (or a last 64) elements, four phases q = 0..3 of element offset p = q ^ 1, each the
// pairs x[8j + p], x[8j + 4 + p] for j = 0, 1, ...
void split_for_rows_bf16(const float* x, int64_t M, int64_t K, uint16_t* xb);
// Whether the decode products at BF16 inputs take nf4_dot_rows_bf16: AVX512_BF16 here and an AMD CPU
// (where it beats the float32 kernel), or FERRY_CPU_BF16_DOT=1 (0: never).
bool nf4_bf16_dot_fast();
// The same for one BF16 row (any K) against x split in kBf16Group / kBf16Phases.
void bf16_dot_rows(const uint16_t* w, const float* xs, int64_t ldx, int64_t K, int64_t M, float* out);
// The same for one Q8 row against x [M, ldx]: out[m] = scale * sum_k q[k] x[m, k].
void q8_dot_rows(const int8_t* q, float scale, const float* x, int64_t ldx, int64_t K, int64_t M, float* out);
// y[i] += a * x[i]
void axpy_f32(float a, const float* x, float* y, int64_t n);
// x[i] *= a
void scale_f32(float a, float* x, int64_t n);
// Returns sum(x[i]^2).
float sumsq_f32(const float* x, int64_t n);
// The row kernels' software prefetch distance in bytes (FERRY_CPU_PREFETCH; 0: none).
int64_t prefetch_distance();
// Returns the name of the ISA level the kernels dispatched to ("avx512", "avx2", "baseline").
const char* simd_level();

}  // namespace ferry::cpu
