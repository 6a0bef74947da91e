#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {
constexpr int kThreads = 512;
constexpr int kMaxPerThread = 16;  // n_embd <= 8192 keeps the row in registers

// One block per row. The row (plus residual) is loaded into registers with every load issued before
// the first use, summed, then normalised from registers: one pass over memory, no latency chain.
template <bool kInRegs, bool kF16>
__global__ void __launch_bounds__(kThreads) add_rmsnorm_kernel(float* __restrict__ x, const float* __restrict__ delta,
                                                               const bf16* __restrict__ w, const int32_t* __restrict__ rows,
                                                               int64_t n_embd, float eps, bf16* __restrict__ out, bf16* __restrict__ out_lo) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  pdl_launch_dependents();
  pdl_wait();  // launched programmatically: everything below reads what the kernel before wrote
  const int64_t src = rows ? rows[r] : r;
  float* xr = x + src * n_embd;
  const float* dr = delta ? delta + src * n_embd : nullptr;
  float ss = 0.0f;
  float v[kMaxPerThread];
  if (kInRegs) {
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      const int64_t i = threadIdx.x + j * kThreads;
      v[j] = i < n_embd ? xr[i] : 0.0f;
    }
    if (dr) {
#pragma unroll
      for (int j = 0; j < kMaxPerThread; ++j) {
        const int64_t i = threadIdx.x + j * kThreads;
        if (i < n_embd) {
          v[j] += dr[i];
          xr[i] = v[j];
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) ss += v[j] * v[j];
  } else {
    for (int64_t i = threadIdx.x; i < n_embd; i += kThreads) {
      float a = xr[i];
      if (dr) {
        a += dr[i];
        xr[i] = a;
      }
      ss += a * a;
    }
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / static_cast<float>(n_embd) + eps);
  bf16* o = out + r * n_embd;
  bf16* ol = out_lo ? out_lo + r * n_embd : nullptr;
  auto emit = [&](int64_t i, float a) {
    const float y = __bfloat162float(w[i]) * (a * inv);
    if constexpr (kF16) {  // FP16 bits in the BF16 buffers; saturated, never infinite
      const __half hi = __float2half_rn(fminf(fmaxf(y, -65504.0f), 65504.0f));
      o[i] = __ushort_as_bfloat16(__half_as_ushort(hi));
      if (ol) ol[i] = __ushort_as_bfloat16(__half_as_ushort(__float2half_rn(y - __half2float(hi))));
    } else {
      const bf16 hi = __float2bfloat16(y);
      o[i] = hi;
      if (ol) ol[i] = __float2bfloat16(y - __bfloat162float(hi));
    }
  };
  if (kInRegs) {
#pragma unroll
    for (int j = 0; j < kMaxPerThread; ++j) {
      const int64_t i = threadIdx.x + j * kThreads;
      if (i < n_embd) emit(i, v[j]);
    }
  } else {
    for (int64_t i = threadIdx.x; i < n_embd; i += kThreads) emit(i, xr[i]);
  }
}
}  // namespace

void add_rmsnorm(float* x, const float* delta, const bf16* w, const int32_t* rows, int64_t n_rows, int64_t n_embd, float eps,
                 bf16* out, cudaStream_t s, bf16* out_lo, bool f16) {
  if (n_rows == 0) return;
  // Launched with programmatic stream serialization (sm_90+): its launch and start overlap the tail of
  // the kernel before it (a decode GEMV), and pdl_wait() holds its reads until that kernel is done.
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(n_rows));
  cfg.blockDim = dim3(kThreads);
  cfg.stream = s;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = programmatic_launch() ? 1 : 0;
  const bool regs = n_embd <= kThreads * kMaxPerThread;
  auto kernel = f16 ? (regs ? add_rmsnorm_kernel<true, true> : add_rmsnorm_kernel<false, true>)
                    : (regs ? add_rmsnorm_kernel<true, false> : add_rmsnorm_kernel<false, false>);
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, x, delta, w, rows, n_embd, eps, out, out_lo));
}

}  // namespace ferry::gpu

namespace ferry::gpu {

namespace {
__global__ void add_f32_kernel(float* __restrict__ x, const float* __restrict__ d, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) x[i] += d[i];
}
}  // namespace

void add_f32(float* x, const float* delta, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  add_f32_kernel<<<ceil_div(n, 256), 256, 0, s>>>(x, delta, n);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu
