#include "gpu/kernels.h"

namespace ferry::gpu {

void gemm(cublasHandle_t h, const bf16* x, const bf16* w, void* y, int64_t M, int64_t N, int64_t K, bool y_f32) {
  const float one = 1.0f, zero = 0.0f;
  // Column-major view: C^T [N, M] = op(W) [N, K] x X^T [K, M], W row-major [N, K] read transposed.
  CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &one, w,
                            CUDA_R_16BF, static_cast<int>(K), x, CUDA_R_16BF, static_cast<int>(K), &zero, y,
                            y_f32 ? CUDA_R_32F : CUDA_R_16BF, static_cast<int>(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void gemm_ld(cublasHandle_t h, const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, int64_t ldy, bool accumulate) {
  const float one = 1.0f, zero = 0.0f;
  CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &one, w,
                            CUDA_R_16BF, static_cast<int>(K), x, CUDA_R_16BF, static_cast<int>(K), accumulate ? &one : &zero, y, CUDA_R_32F,
                            static_cast<int>(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace ferry::gpu
