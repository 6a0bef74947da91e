// Vector kernels with run-time ISA dispatch: each is compiled for AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and baseline x86-64, and the loader picks the best the CPU supports (GCC
// target_clones / ifunc). The loops are written for the auto-vectoriser (omp simd reductions).
#pragma once

#include <cstdint>

#include "models/weight_format.h"
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
// BF16 inputs (GemmPrecision::kBf16Inputs, the GPU executor's CPU layers): NF4 decode products by
//   kI16: nf4_dot_rows_i16 where the CPU has AVX512_VNNI or AVX2: code values as int16 (kNf4CodesI16:
//         4096 is 1.0) and x as int16 with a scale a group of 128 (16383 is its largest |x|), summed
//         exactly in int32 by vpdpwssd (AVX2: byte-shuffle lookups and vpmaddwd), each block's sum
//         scaled in float. Its rounding moves a product about a tenth as far as BF16 code values and x
//         (the GPU's tensor-core GEMV) do.
//   kF32: nf4_dot_rows above, exact, elsewhere or with FERRY_CPU_NF4_DOT=f32.
enum class Nf4Dot { kF32, kI16 };
Nf4Dot nf4_decode_dot();
// Makes nf4_decode_dot() return d (or the exact kernel where the CPU lacks d) from now on, for tests
// and benchmarks; returns the kernel it will use.
Nf4Dot set_nf4_decode_dot(Nf4Dot d);
const char* nf4_dot_name(Nf4Dot d);
inline constexpr float kI16XMax = 16383.0f, kI16CodeOne = 4096.0f;
constexpr int16_t nf4_code_i16(float v) { return static_cast<int16_t>(v * kI16CodeOne + (v < 0 ? -0.5f : 0.5f)); }
inline constexpr int16_t kNf4CodesI16[16] = {
    nf4_code_i16(kNf4Codes[0]),  nf4_code_i16(kNf4Codes[1]),  nf4_code_i16(kNf4Codes[2]),  nf4_code_i16(kNf4Codes[3]),
    nf4_code_i16(kNf4Codes[4]),  nf4_code_i16(kNf4Codes[5]),  nf4_code_i16(kNf4Codes[6]),  nf4_code_i16(kNf4Codes[7]),
    nf4_code_i16(kNf4Codes[8]),  nf4_code_i16(kNf4Codes[9]),  nf4_code_i16(kNf4Codes[10]), nf4_code_i16(kNf4Codes[11]),
    nf4_code_i16(kNf4Codes[12]), nf4_code_i16(kNf4Codes[13]), nf4_code_i16(kNf4Codes[14]), nf4_code_i16(kNf4Codes[15])};
// x [M, K] (K a multiple of 64) as int16 in the order nf4_dot_rows_i16 reads it: each group g of 128
// (or a last 64) elements of row m times 16383 / max|x| rounded to the nearest (even) integer, in
// four phases q = 0..3 of element offset p = q ^ 1, each the pairs x[8j + p], x[8j + 4 + p] for j =
// 0, 1, ...; scales[m * G + g] = max|x| / 16383 / 4096 (G = ceil(K / 128)), which folds in the code
// values' fixed point (NaN where the group holds a NaN, infinite where an infinity: the products
// are not finite either).
void split_for_rows_i16(const float* x, int64_t M, int64_t K, int16_t* xq, float* scales);
// The dot of one NF4 row with M <= 3 rows of int16 x from split_for_rows_i16 ([M, ldx], scales [M, G]);
// without AVX512_VNNI or AVX2 a scalar loop with the same arithmetic (slowly: for the tests).
void nf4_dot_rows_i16(const uint8_t* codes, const float* absmax, const int16_t* xq, const float* scales, int64_t ldx, int64_t K, int64_t M, float* out);
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
// Returns the name of the ISA level the kernels dispatched to ("avx512", "avx2", "baseline").
const char* simd_level();

}  // namespace ferry::cpu
