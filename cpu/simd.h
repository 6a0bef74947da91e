// Vector kernels with run-time ISA dispatch: each is compiled for AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and baseline x86-64, and the loader picks the best the CPU supports (GCC
// target_clones / ifunc). The loops are written for the auto-vectoriser (omp simd reductions).
#pragma once

#include <cstdint>

namespace ferry::cpu {

// Returns sum(a[i] * b[i]) accumulated in float32.
float dot_f32(const float* a, const float* b, int64_t n);
// dst[i] = float(src[i]) for bf16 / f16 bit patterns.
void bf16_to_f32_row(const uint16_t* src, float* dst, int64_t n);
void f16_to_f32_row(const uint16_t* src, float* dst, int64_t n);
// y[i] += a * x[i]
void axpy_f32(float a, const float* x, float* y, int64_t n);
// x[i] *= a
void scale_f32(float a, float* x, int64_t n);
// Returns sum(x[i]^2).
float sumsq_f32(const float* x, int64_t n);
// Returns the name of the ISA level the kernels dispatched to ("avx512", "avx2", "baseline").
const char* simd_level();

}  // namespace ferry::cpu
