// Quantisation on the GPU (models/weight_format.h): a layer generated or uploaded in BF16 becomes
// its NF4 / NF4-DQ / Q8 blob where it will live, bit for bit as the host codec would make it, and the
// inverse for cuBLAS at many rows.
#include <cfloat>

#include "gpu/kernels.h"
#include "gpu/dynamic_map.cuh"
#include "models/weight_format.h"

namespace ferry::gpu {

namespace {

#define FERRY_NF4(i) kNf4Codes[i]
#define FERRY_MID(i) 0.5f * (kNf4Codes[i] + kNf4Codes[i + 1])
__constant__ float c_codes[16] = {FERRY_NF4(0), FERRY_NF4(1), FERRY_NF4(2),  FERRY_NF4(3),  FERRY_NF4(4),  FERRY_NF4(5),  FERRY_NF4(6),  FERRY_NF4(7),
                                  FERRY_NF4(8), FERRY_NF4(9), FERRY_NF4(10), FERRY_NF4(11), FERRY_NF4(12), FERRY_NF4(13), FERRY_NF4(14), FERRY_NF4(15)};
// Midpoints between neighbouring codes, computed as the host codec computes them (float).
__constant__ float c_mid[15] = {FERRY_MID(0), FERRY_MID(1), FERRY_MID(2),  FERRY_MID(3),  FERRY_MID(4),  FERRY_MID(5),  FERRY_MID(6), FERRY_MID(7),
                                FERRY_MID(8), FERRY_MID(9), FERRY_MID(10), FERRY_MID(11), FERRY_MID(12), FERRY_MID(13), FERRY_MID(14)};
#undef FERRY_NF4
#undef FERRY_MID

// One warp per block of 64 (lane l: elements 2l, 2l + 1). x holds the rows being quantised; e0 is
// x[0]'s element index in the weight.
__global__ void nf4_kernel(const bf16* __restrict__ x, int64_t n, int64_t e0, uint8_t* __restrict__ codes, float* __restrict__ absmax) {
  const int64_t blk = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (blk * 64 >= n) return;  // whole warps leave together (n is a multiple of 64)
  const float a = __bfloat162float(x[blk * 64 + 2 * lane]), b = __bfloat162float(x[blk * 64 + 2 * lane + 1]);
  const float m = warp_max(fmaxf(fabsf(a), fabsf(b)));
  const float inv = m > 0 ? 1.0f / m : 0.0f;
  auto nearest = [&](float v) {
    int c = 0;
    while (c < 15 && v > c_mid[c]) ++c;
    return c;
  };
  const int ca = m > 0 ? nearest(__fmul_rn(a, inv)) : 7, cb = m > 0 ? nearest(__fmul_rn(b, inv)) : 7;
  const int64_t e = e0 + blk * 64;
  codes[e / 2 + lane] = static_cast<uint8_t>(ca << 4 | cb);
  if (lane == 0) absmax[e / 64] = m;
}

// One block per row: scale = max|row| / 127, q = rint(x * 127 / max), clamped.
__global__ void q8_kernel(const bf16* __restrict__ x, int64_t cols, int64_t r0, int8_t* __restrict__ q, float* __restrict__ scale) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const bf16* xr = x + r * cols;
  float m = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, fabsf(__bfloat162float(xr[c])));
  // block max through block_sum's scratch pattern
  m = warp_max(m);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  m = (threadIdx.x & 31) < (blockDim.x >> 5) ? red[threadIdx.x & 31] : 0.0f;
  m = warp_max(m);
  const float inv = m > 0 ? 127.0f / m : 0.0f;
  int8_t* qr = q + (r0 + r) * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    qr[c] = static_cast<int8_t>(fminf(fmaxf(rintf(__fmul_rn(__bfloat162float(xr[c]), inv)), -127.0f), 127.0f));
  if (threadIdx.x == 0) scale[r0 + r] = m / 127.0f;
}

// NF4-DQ's absmax codes, second-level scales and mean (null for the other formats).
struct Dq {
  const uint8_t* codes = nullptr;
  const float* a2 = nullptr;
  const float* means = nullptr;
};

// NF4 block i's absmax: fp32, or NF4-DQ's map[code] * absmax2 + mean rounded twice (bitsandbytes').
__device__ __forceinline__ float nf4_absmax(const float* scales, const Dq& dq, int64_t i) {
  if (dq.codes) return dq_absmax(c_dmap.v[__ldg(dq.codes + i)], __ldg(dq.a2 + (i >> 8)), __ldg(dq.means + (i >> 8)));
  return __ldg(scales + i);
}

__global__ void dequant_kernel(int fmt, const uint8_t* __restrict__ blob, const float* __restrict__ scales, Dq dq, int64_t cols, int64_t e0, int64_t n,
                               bf16* __restrict__ y, bf16* __restrict__ y_lo) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = e0 + i;
    float v;
    if (fmt == 0) {
      const uint8_t b = blob[e / 2];
      v = c_codes[e % 2 == 0 ? b >> 4 : b & 0x0f] * nf4_absmax(scales, dq, e / 64);
    } else {
      v = static_cast<float>(reinterpret_cast<const int8_t*>(blob)[e]) * scales[e / cols];
    }
    const bf16 hi = __float2bfloat16(v);
    y[i] = hi;
    if (y_lo) y_lo[i] = __float2bfloat16(v - __bfloat162float(hi));
  }
}

// The same, 16 elements a thread with vector loads and stores: NF4 from 8 code bytes under one block
// scale (16 divides 64), int8 from 16 bytes under the row's scale (16 divides cols). The code table is
// in shared memory: from constant memory a warp's 16 different codes were read one after another,
// and the one-element kernel held a 70B layer's dequantisation at 16 rows to 5.8 ms a layer.
__device__ __forceinline__ uint32_t pack_bf16x2(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__global__ void dequant16_kernel(int fmt, const uint8_t* __restrict__ blob, const float* __restrict__ scales, Dq dq, int64_t cols, int64_t e0,
                                 int64_t n16, bf16* __restrict__ y, bf16* __restrict__ y_lo) {
  __shared__ float tab[16];
  if (threadIdx.x < 16) tab[threadIdx.x] = c_codes[threadIdx.x];
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n16; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = e0 + 16 * i;
    float v[16];
    if (fmt == 0) {
      const uint2 c = __ldg(reinterpret_cast<const uint2*>(blob + e / 2));
      const float a = nf4_absmax(scales, dq, e / 64);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t b = ((j < 4 ? c.x : c.y) >> (8 * (j & 3))) & 0xff;
        v[2 * j] = tab[b >> 4] * a;
        v[2 * j + 1] = tab[b & 0x0f] * a;
      }
    } else {
      const uint4 c = __ldg(reinterpret_cast<const uint4*>(blob + e));
      const float a = __ldg(scales + e / cols);
      const uint32_t w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
      for (int j = 0; j < 16; ++j) v[j] = static_cast<float>(static_cast<int8_t>((w[j / 4] >> (8 * (j & 3))) & 0xff)) * a;
    }
    uint32_t hi[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) hi[j] = pack_bf16x2(v[2 * j], v[2 * j + 1]);
    uint4* out = reinterpret_cast<uint4*>(y + 16 * i);
    out[0] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    out[1] = make_uint4(hi[4], hi[5], hi[6], hi[7]);
    if (y_lo) {
      uint32_t lo[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&hi[j]);
        lo[j] = pack_bf16x2(v[2 * j] - __low2float(h), v[2 * j + 1] - __high2float(h));
      }
      uint4* out_lo = reinterpret_cast<uint4*>(y_lo + 16 * i);
      out_lo[0] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
      out_lo[1] = make_uint4(lo[4], lo[5], lo[6], lo[7]);
    }
  }
}

// NF4-DQ, step 1: the mean of the n fp32 absmax, summed in double (one block, a fixed order) and
// rounded to float as the host codec does.
__global__ void dq_mean_kernel(const float* __restrict__ absmax, int64_t n, float* __restrict__ mean) {
  __shared__ double part[1024];
  double s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += absmax[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *mean = n > 0 ? static_cast<float>(part[0] / static_cast<double>(n)) : 0.0f;
}

// Step 2: one block of 256 threads per 256 absmax: absmax2 = max |absmax - mean|, each code the
// nearest map value of (absmax - mean) / absmax2 (the lower on a tie), as quantize_absmax_dq; the
// part's mean (means[0], written by step 1) copied to each block's.
__global__ void dq_codes_kernel(const float* __restrict__ absmax, int64_t n, float* means, uint8_t* __restrict__ codes,
                                float* __restrict__ absmax2) {
  __shared__ float map[256];
  __shared__ float red[8];
  map[threadIdx.x] = c_dmap.v[threadIdx.x];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  const float off = means[0];
  if (threadIdx.x == 0 && blockIdx.x > 0) means[blockIdx.x] = off;
  const float d = i < n ? __fsub_rn(absmax[i], off) : 0.0f;
  float m = warp_max(fabsf(d));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  m = red[0];
  for (int w = 1; w < 8; ++w) m = fmaxf(m, red[w]);
  if (threadIdx.x == 0) absmax2[blockIdx.x] = m;
  if (i >= n) return;
  const float v = m > 0 ? __fdiv_rn(d, m) : 0.0f;
  int lo = 0, hi = 256;  // the first map value >= v
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (map[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  int c = lo;
  if (c == 256) c = 255;
  else if (c > 0 && fabsf(__fsub_rn(map[c - 1], v)) <= fabsf(__fsub_rn(map[c], v))) c = c - 1;
  codes[i] = static_cast<uint8_t>(c);
}

}  // namespace

void finish_quant(DType t, int64_t rows, int64_t cols, const float* stage, uint8_t* blob, cudaStream_t s, const std::vector<int64_t>& part_rows) {
  if (t != DType::kNF4DQ) return;
  if (stage == nullptr) throw CudaError("finish_quant: NF4-DQ needs the fp32 absmax stage");
  const QuantLayout l = quant_layout(t, rows, cols);
  float* a2 = reinterpret_cast<float*>(blob + l.scales2);
  float* means = reinterpret_cast<float*>(blob + l.means);
  for (auto [a0, a1] : dq_parts(rows, cols, part_rows)) {
    if (a1 == a0) continue;
    dq_mean_kernel<<<1, 1024, 0, s>>>(stage + a0, a1 - a0, means + a0 / 256);
    CUDA_CHECK_LAUNCH();
    dq_codes_kernel<<<ceil_div(a1 - a0, 256), 256, 0, s>>>(stage + a0, a1 - a0, means + a0 / 256, blob + l.scales + a0, a2 + a0 / 256);
    CUDA_CHECK_LAUNCH();
  }
}

void quantize_rows(DType t, const bf16* x, int64_t rows, int64_t cols, int64_t r0, int64_t r1, uint8_t* blob, cudaStream_t s, float* stage) {
  if (cols % quant_col_multiple(t) != 0 || r0 > r1 || r1 > rows) throw CudaError("quantize_rows: bad shape");
  if (t == DType::kNF4DQ && stage == nullptr) throw CudaError("quantize_rows: NF4-DQ needs the fp32 absmax stage");
  if (r1 == r0) return;
  const QuantLayout l = quant_layout(t, rows, cols);
  float* scales = reinterpret_cast<float*>(blob + l.scales);
  if (is_nf4(t)) {
    const int64_t n = (r1 - r0) * cols, warps = n / 64;
    nf4_kernel<<<ceil_div(warps * 32, 256), 256, 0, s>>>(x, n, r0 * cols, blob, t == DType::kNF4DQ ? stage : scales);
  } else if (t == DType::kQ8) {
    q8_kernel<<<static_cast<unsigned>(r1 - r0), 256, 0, s>>>(x, cols, r0, reinterpret_cast<int8_t*>(blob), scales);
  } else {
    throw CudaError("quantize_rows: not a quantised format");
  }
  CUDA_CHECK_LAUNCH();
}

void dequantize_rows(DType t, const uint8_t* blob, int64_t rows, int64_t cols, int64_t r0, int64_t r1, bf16* y, cudaStream_t s, bf16* y_lo) {
  if (!is_quantized(t) || r0 > r1 || r1 > rows) throw CudaError("dequantize_rows: bad arguments");
  const int64_t n = (r1 - r0) * cols;
  if (n == 0) return;
  const QuantLayout l = quant_layout(t, rows, cols);
  const int fmt = is_nf4(t) ? 0 : 1;
  const float* scales = reinterpret_cast<const float*>(blob + l.scales);
  Dq dq;
  if (t == DType::kNF4DQ) dq = {blob + l.scales, reinterpret_cast<const float*>(blob + l.scales2), reinterpret_cast<const float*>(blob + l.means)};
  auto aligned = [](const void* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; };
  if (cols % 16 == 0 && aligned(blob, 16) && aligned(y, 16) && (!y_lo || aligned(y_lo, 16))) {
    const int64_t n16 = n / 16;
    dequant16_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(n16, 256), 65535)), 256, 0, s>>>(fmt, blob, scales, dq, cols, r0 * cols, n16,
                                                                                                          y, y_lo);
  } else {
    dequant_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 65535)), 256, 0, s>>>(fmt, blob, scales, dq, cols, r0 * cols, n, y,
                                                                                                        y_lo);
  }
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu
