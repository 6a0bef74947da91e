// Weight-streaming GEMV for decode: y[M, N] (f32) = x[M, K] W[N, K]^T with M <= kGemvMaxRows.
// One warp per output row n (a persistent grid striding over rows measured slower on the H100: 170 ->
// 155 tok/s for Llama-2-7B, notes/gpu.md); each lane walks K in 16-byte chunks (8 bf16) of W, four chunks in flight,
// and reads the matching x chunks (small and L1/L2 resident). Float32 accumulation, warp reduction.
// Over resident weights it is launched programmatically (sm_90+), so its weight stream overlaps the
// small kernel before it (notes/gpu.md).
#include <cstdlib>
#include <string>

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

// x chunk (8 bf16) -> floats; with `lo`, the hi + lo parts' sum (about 16 mantissa bits).
__device__ __forceinline__ void load_x8(const uint4* xr, const uint4* xl, int64_t c, float (&xf)[8]) {
  const uint4 h = __ldg(xr + c);
  const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&h);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h2[i]);
    xf[2 * i] = f.x;
    xf[2 * i + 1] = f.y;
  }
  if (xl) {
    const uint4 l = __ldg(xl + c);
    const __nv_bfloat162* l2 = reinterpret_cast<const __nv_bfloat162*>(&l);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(l2[i]);
      xf[2 * i] += f.x;
      xf[2 * i + 1] += f.y;
    }
  }
}

__device__ __forceinline__ void fma8(const uint4& w, const float (&xf)[8], float& acc) {
  const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&w);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 wf = __bfloat1622float2(w2[i]);
    acc = fmaf(wf.x, xf[2 * i], acc);
    acc = fmaf(wf.y, xf[2 * i + 1], acc);
  }
}

// kLo: x_lo [M, K] holds the lo BF16 parts of x (add_rmsnorm's out_lo); each row's x is hi + lo.
template <int M, bool kLo>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gemv_kernel(const bf16* __restrict__ x, const bf16* __restrict__ x_lo, const bf16* __restrict__ w,
                                                                    float* __restrict__ y, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + n * K);
  const int64_t chunks = K / 8;  // K % 8 == 0 (checked by the launcher)
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  // Software-pipelined: the next four chunks are in flight while this four's products run. The first
  // four are loaded before pdl_wait(): launched programmatically (resident weights), the weight stream
  // starts while the kernel before still runs; x and y are touched only after it.
  int64_t c = lane;
  uint4 wv[4];
  if (c + 96 < chunks) {
#pragma unroll
    for (int u = 0; u < 4; ++u) wv[u] = __ldcs(wr + c + 32 * u);  // streamed once: do not keep in L2
  }
  pdl_wait();
  while (c + 96 < chunks) {
    uint4 cur[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) cur[u] = wv[u];
    const int64_t next = c + 128;
    if (next + 96 < chunks) {
#pragma unroll
      for (int u = 0; u < 4; ++u) wv[u] = __ldcs(wr + next + 32 * u);
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const uint4* xr = reinterpret_cast<const uint4*>(x + m * K);
      if constexpr (kLo) {
        const uint4* xl = reinterpret_cast<const uint4*>(x_lo + m * K);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          float xf[8];
          load_x8(xr, xl, c + 32 * u, xf);
          fma8(cur[u], xf, acc[m]);
        }
      } else {
#pragma unroll
        for (int u = 0; u < 4; ++u) fma8(cur[u], __ldg(xr + c + 32 * u), acc[m]);
      }
    }
    c = next;
  }
  for (; c < chunks; c += 32) {
    const uint4 wt = __ldcs(wr + c);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if constexpr (kLo) {
        float xf[8];
        load_x8(reinterpret_cast<const uint4*>(x + m * K), reinterpret_cast<const uint4*>(x_lo + m * K), c, xf);
        fma8(wt, xf, acc[m]);
      } else {
        fma8(wt, __ldg(reinterpret_cast<const uint4*>(x + m * K) + c), acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0) y[m * N + n] = v;
  }
}

template <int M>
void launch_gemv(const bf16* x, const bf16* x_lo, const bf16* w, float* y, int64_t N, int64_t K, bool programmatic, cudaStream_t s) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>((N + kWarpsPerBlock - 1) / kWarpsPerBlock));
  cfg.blockDim = dim3(kWarpsPerBlock * 32);
  cfg.stream = s;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = programmatic ? 1 : 0;
  if (x_lo) CUDA_CHECK(cudaLaunchKernelEx(&cfg, gemv_kernel<M, true>, x, x_lo, w, y, N, K));
  else CUDA_CHECK(cudaLaunchKernelEx(&cfg, gemv_kernel<M, false>, x, x_lo, w, y, N, K));
}

// Whether programmatic launches are on: an sm_90+ device and FERRY_GPU_PDL not 0.
bool programmatic_launch() {
  static const bool on = [] {
    const char* e = std::getenv("FERRY_GPU_PDL");
    if (e && std::string(e) == "0") return false;
    int dev = 0, major = 0;
    return cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
           major >= 9;
  }();
  return on;
}

}  // namespace

void gemv(const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s, bool weights_fixed, const bf16* x_lo) {
  if (K % 8 != 0 || M < 1 || M > kGemvMaxRows) throw CudaError("gemv: needs K % 8 == 0 and 1 <= M <= 8");
  const bool p = weights_fixed && programmatic_launch();
  switch (M) {
    case 1: launch_gemv<1>(x, x_lo, w, y, N, K, p, s); break;
    case 2: launch_gemv<2>(x, x_lo, w, y, N, K, p, s); break;
    case 3: launch_gemv<3>(x, x_lo, w, y, N, K, p, s); break;
    case 4: launch_gemv<4>(x, x_lo, w, y, N, K, p, s); break;
    case 5: launch_gemv<5>(x, x_lo, w, y, N, K, p, s); break;
    case 6: launch_gemv<6>(x, x_lo, w, y, N, K, p, s); break;
    case 7: launch_gemv<7>(x, x_lo, w, y, N, K, p, s); break;
    case 8: launch_gemv<8>(x, x_lo, w, y, N, K, p, s); break;
    default: throw CudaError("gemv: no kernel for " + std::to_string(M) + " rows");
  }
}

void gemm_f32(cublasHandle_t h, const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s, bool weights_fixed) {
  if (M <= kGemvPreferRows && K % 8 == 0) gemv(x, w, y, M, N, K, s, weights_fixed);
  else gemm(h, x, w, y, M, N, K, true);
}

}  // namespace ferry::gpu
