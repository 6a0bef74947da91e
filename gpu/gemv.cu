// Weight-streaming GEMV for decode: y[M, N] (f32) = x[M, K] W[N, K]^T with M <= kGemvMaxRows.
// One warp per output row n (a persistent grid striding over rows measured slower on the H100: 170 ->
// 155 tok/s for Llama-2-7B, notes/gpu.md); each lane walks K in 16-byte chunks (8 bf16) of W, four chunks in flight,
// and reads the matching x chunks (small and L1/L2 resident). Float32 accumulation, warp reduction.
#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {

constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ void fma8(const uint4& w, const uint4& x, float& acc) {
  const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&w);
  const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 wf = __bfloat1622float2(w2[i]);
    const float2 xf = __bfloat1622float2(x2[i]);
    acc = fmaf(wf.x, xf.x, acc);
    acc = fmaf(wf.y, xf.y, acc);
  }
}

template <int M>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gemv_kernel(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                                    float* __restrict__ y, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + n * K);
  const int64_t chunks = K / 8;  // K % 8 == 0 (checked by the launcher)
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  int64_t c = lane;
  for (; c + 96 < chunks; c += 128) {
    uint4 wv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) wv[u] = __ldcs(wr + c + 32 * u);  // streamed once: do not keep in L2
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const uint4* xr = reinterpret_cast<const uint4*>(x + m * K);
#pragma unroll
      for (int u = 0; u < 4; ++u) fma8(wv[u], __ldg(xr + c + 32 * u), acc[m]);
    }
  }
  for (; c < chunks; c += 32) {
    const uint4 wv = __ldcs(wr + c);
#pragma unroll
    for (int m = 0; m < M; ++m) fma8(wv, __ldg(reinterpret_cast<const uint4*>(x + m * K) + c), acc[m]);
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) y[m * N + n] = v;
  }
}

}  // namespace

void gemv(const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s) {
  if (K % 8 != 0 || M < 1 || M > kGemvMaxRows) throw CudaError("gemv: needs K % 8 == 0 and 1 <= M <= 8");
  const unsigned grid = static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock);
  switch (M) {
    case 1: gemv_kernel<1><<<grid, kWarpsPerBlock * 32, 0, s>>>(x, w, y, N, K); break;
    case 2: gemv_kernel<2><<<grid, kWarpsPerBlock * 32, 0, s>>>(x, w, y, N, K); break;
    case 3: gemv_kernel<3><<<grid, kWarpsPerBlock * 32, 0, s>>>(x, w, y, N, K); break;
    case 4: gemv_kernel<4><<<grid, kWarpsPerBlock * 32, 0, s>>>(x, w, y, N, K); break;
    case 5: gemv_kernel<5><<<grid, kWarpsPerBlock * 32, 0, s>>>(x, w, y, N, K); break;
    case 6: gemv_kernel<6><<<grid, kWarpsPerBlock * 32, 0, s>>>(x, w, y, N, K); break;
    case 7: gemv_kernel<7><<<grid, kWarpsPerBlock * 32, 0, s>>>(x, w, y, N, K); break;
    case 8: gemv_kernel<8><<<grid, kWarpsPerBlock * 32, 0, s>>>(x, w, y, N, K); break;
    default: throw CudaError("gemv: no kernel for " + std::to_string(M) + " rows");
  }
  CUDA_CHECK_LAUNCH();
}

void gemm_f32(cublasHandle_t h, const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s) {
  if (M <= kGemvPreferRows && K % 8 == 0) gemv(x, w, y, M, N, K, s);
  else gemm(h, x, w, y, M, N, K, true);
}

}  // namespace ferry::gpu
