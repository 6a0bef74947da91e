// CPU matrix products against weights stored as Hugging Face Linear weights W [N, K] (row-major,
// y = x W^T), in F32, F16, BF16, NF4 or int8, with float32 activations and float32 accumulation.
//
// Two paths: for a few rows (decode at small batch) a weight-streaming kernel reads each weight row
// once and dots it with every activation row (the bytes of W are the cost): BF16, NF4 and int8 rows
// decoded in registers (cpu/simd.h), F32 and F16 through a float row in cache; for many rows
// (prefill) oneDNN's matmul runs over panels of W converted on the fly, on OpenMP's threads.
// Call from the main thread, not from inside a TBB task: oneDNN threads with OpenMP.
#pragma once

#include <cstdint>

#include "runtime/tensor.h"

namespace ferry::cpu {

// kExact: float32 activations (the reference). kBf16Inputs: above kGemvMaxRows rows, activations are
// rounded to BF16 and BF16 weights multiplied in place by oneDNN's BF16 matmul (AMX / AVX-512 BF16;
// float32 accumulation), as the GPU does; where oneDNN has no fast BF16 kernel the exact path runs.
// At decode rows NF4 / NF4-DQ products (where the CPU has AVX512_VNNI) take int16 code values and
// activations summed exactly in int32 (cpu/simd.h nf4_dot_rows_i16), a rounding about a tenth of
// BF16's; FERRY_CPU_NF4_DOT=f32 keeps the exact kernel.
enum class GemmPrecision { kExact, kBf16Inputs };

// y[M, N] = x[M, K] W[N, K]^T (+ bias[N] when `bias` is not empty).
void gemm_xwt(const float* x, int64_t M, const TensorView& W, float* y, const TensorView& bias = {},
              GemmPrecision precision = GemmPrecision::kExact);

// Rows at or below which the weight-streaming kernel is used (bench_cpu_gemm: it wins at 1-2 rows and
// ties at 4 on an AVX2 Zen 5 core pair, notes/cpu.md).
inline constexpr int64_t kGemvMaxRows = 3;

// Converts row n of W [N, K] (F32, F16, BF16, or a quantised blob: models/weight_format.h) to float32.
void row_to_f32(const TensorView& W, int64_t n, float* dst);

// C[M, N] = alpha * op(A) op(B) + beta * C, row-major float32 (op: transposed where ta / tb; A is
// [M, K] or [K, M], B [K, N] or [N, K]), on oneDNN's sgemm (OpenMP threads): the training pass's
// products (cpu/lora_train.h). Call from the main thread, as gemm_xwt.
void sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
           float beta, float* C, int64_t ldc);

// The two paths, exposed for tests and benchmarks.
void gemm_xwt_stream(const float* x, int64_t M, const TensorView& W, float* y, GemmPrecision precision = GemmPrecision::kExact);
void gemm_xwt_onednn(const float* x, int64_t M, const TensorView& W, float* y);

}  // namespace ferry::cpu
