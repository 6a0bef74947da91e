// Weight-streaming GEMV for decode: y[M, N] = x[M, K] W[N, K]^T with M <= kGemvMaxRows, W in BF16 or
// quantised (NF4: a 16-entry code table in shared memory and an absmax per 64, fp32 or NF4-DQ's
// double-quantised 8-bit code; Q8: a scale per row; models/weight_format.h), and its fused forms for
// the decode layer (kernels.h): the residual add with the next RMSNorm's sums of squares, SwiGLU over
// gate and up rows, RoPE + K/V append over the QKV rows, and an input that is the residual stream
// normalised on the fly.
// One warp per task (an output row, or the two rows an epilogue pairs: gate i and up i, or a rotary
// pair's two columns); a persistent grid striding over rows measured slower on the H100 (170 -> 155
// tok/s for Llama-2-7B, notes/gpu.md). Each lane walks K in 16-byte chunks (8 bf16) of W, four
// chunks a row in flight, and reads the matching x chunks (small and L1/L2 resident). Float32
// accumulation, warp reduction. Over resident weights it is launched programmatically (sm_90+), so
// its weight stream overlaps the kernel before it (notes/gpu.md).
// NF4 / NF4-DQ with up to 4 columns of x take a second kernel on the tensor cores (nf4_mma_kernel,
// below; notes/quant.md), where the device has the shared memory for it (H100 / H200).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "gpu/rope_kv.cuh"
#include "gpu/dynamic_map.cuh"
#include "models/weight_format.h"

namespace ferry::gpu {

namespace {

constexpr int kWarpsPerBlock = 8;
enum Src { kSrcBf16, kSrcHiLo, kSrcNorm };
// Weight formats (models/weight_format.h): a lane's 16-byte chunk holds 8 BF16, 32 NF4 (half a block
// of 64: one absmax) or 16 Q8 elements (the row's scale applied once at the end).
enum Fmt { kFmtBf16, kFmtNf4, kFmtQ8 };
template <int kFmt>
constexpr int kChunkElems = kFmt == kFmtBf16 ? 8 : kFmt == kFmtNf4 ? 32 : 16;
__constant__ float c_nf4[16] = {kNf4Codes[0], kNf4Codes[1], kNf4Codes[2],  kNf4Codes[3],  kNf4Codes[4],  kNf4Codes[5],
                                 kNf4Codes[6], kNf4Codes[7], kNf4Codes[8],  kNf4Codes[9],  kNf4Codes[10], kNf4Codes[11],
                                 kNf4Codes[12], kNf4Codes[13], kNf4Codes[14], kNf4Codes[15]};

// A quantised weight's scales: NF4's fp32 absmax or Q8's row scales in `f32`; NF4-DQ's 8-bit absmax
// codes, fp32 absmax2 and means (one each per 256 codes) instead.
struct QScales {
  const float* f32 = nullptr;
  const uint8_t* codes = nullptr;
  const float* a2 = nullptr;
  const float* means = nullptr;
};

__device__ __forceinline__ void bf16x8(const uint4& v, float (&f)[8]) {
  const __nv_bfloat162* v2 = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(v2[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// Row m's x chunk c (8 elements) as floats: the BF16 x, hi + lo, or res * g (normalised later by inv).
template <int kSrc>
__device__ __forceinline__ void load_x8(const GemvIn& in, int64_t K, int m, int64_t c, float (&xf)[8]) {
  if constexpr (kSrc == kSrcNorm) {
    const float4* r = reinterpret_cast<const float4*>(in.res + m * K) + 2 * c;
    const float4 a = __ldg(r), b = __ldg(r + 1);
    float g[8];
    bf16x8(__ldg(reinterpret_cast<const uint4*>(in.g) + c), g);
    xf[0] = a.x * g[0], xf[1] = a.y * g[1], xf[2] = a.z * g[2], xf[3] = a.w * g[3];
    xf[4] = b.x * g[4], xf[5] = b.y * g[5], xf[6] = b.z * g[6], xf[7] = b.w * g[7];
  } else {
    bf16x8(__ldg(reinterpret_cast<const uint4*>(in.x + m * K) + c), xf);
    if constexpr (kSrc == kSrcHiLo) {
      float lo[8];
      bf16x8(__ldg(reinterpret_cast<const uint4*>(in.x_lo + m * K) + c), lo);
#pragma unroll
      for (int i = 0; i < 8; ++i) xf[i] += lo[i];
    }
  }
}

__device__ __forceinline__ void fma8(const uint4& w, const float (&xf)[8], float& acc) {
  float wf[8];
  bf16x8(w, wf);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc = fmaf(wf[i], xf[i], acc);
}

// The dot of 8 elements of x with weight word(s) of the chunk: NF4 word `sub` (4 bytes, 8 codes, the
// first element in each byte's high nibble) through the code table in shared memory; Q8 words 2 sub,
// 2 sub + 1 (8 int8).
__device__ __forceinline__ float dot8_nf4(uint32_t w, const float (&xf)[8], const float* lut) {
  // Byte offsets into the table, four at a time: byte j of hi (lo) is 4 * the high (low) nibble of w's byte j.
  const uint32_t hi = (w >> 2) & 0x3c3c3c3cu, lo = (w << 2) & 0x3c3c3c3cu;
  const char* base = reinterpret_cast<const char*>(lut);
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    s = fmaf(*reinterpret_cast<const float*>(base + ((hi >> (8 * j)) & 0xffu)), xf[2 * j], s);
    s = fmaf(*reinterpret_cast<const float*>(base + ((lo >> (8 * j)) & 0xffu)), xf[2 * j + 1], s);
  }
  return s;
}
// Q8: each int8 as a float without an integer conversion (a quarter-rate pipe): the byte, offset by
// 128, becomes the mantissa of 2^23 + 128 + q (one byte_perm) and 2^23 + 128 is subtracted (exact).
__device__ __forceinline__ float q8_float(uint32_t w_offset, int j) {
  return __uint_as_float(__byte_perm(w_offset, 0x4b000000u, 0x7440 + j)) - 8388736.0f;
}
__device__ __forceinline__ float dot8_q8(uint32_t lo, uint32_t hi, const float (&xf)[8]) {
  lo ^= 0x80808080u;
  hi ^= 0x80808080u;
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) s = fmaf(q8_float(lo, j), xf[j], s);
#pragma unroll
  for (int j = 0; j < 4; ++j) s = fmaf(q8_float(hi, j), xf[4 + j], s);
  return s;
}
__device__ __forceinline__ uint32_t word(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// acc[r][m] += chunk c (kChunkElems elements) of each of the NR weight rows (cur[r][u]), dotted with
// row m of x: each 8 elements of x are loaded once for all the rows.
template <int kFmt, int kSrc, int NR, int U, int M>
__device__ __forceinline__ void chunk_dots(const GemvIn& in, int64_t K, int m, int64_t c, const uint4 (&cur)[NR][U], int u, const float (&sc)[NR],
                                           const float* lut, float (&acc)[NR][M]) {
  if constexpr (kFmt == kFmtNf4) {
    float part[NR];
#pragma unroll
    for (int r = 0; r < NR; ++r) part[r] = 0.0f;
#pragma unroll
    for (int sub = 0; sub < 4; ++sub) {
      float xf[8];
      load_x8<kSrc>(in, K, m, 4 * c + sub, xf);
#pragma unroll
      for (int r = 0; r < NR; ++r) part[r] += dot8_nf4(word(cur[r][u], sub), xf, lut);
    }
#pragma unroll
    for (int r = 0; r < NR; ++r) acc[r][m] = fmaf(part[r], sc[r], acc[r][m]);
  } else {
#pragma unroll
    for (int sub = 0; sub < 2; ++sub) {
      float xf[8];
      load_x8<kSrc>(in, K, m, 2 * c + sub, xf);
#pragma unroll
      for (int r = 0; r < NR; ++r) acc[r][m] += dot8_q8(word(cur[r][u], 2 * sub), word(cur[r][u], 2 * sub + 1), xf);
    }
  }
}

// Epilogues: which rows a task reads (R of them) and what it does with their M x R products.
struct EpiStore {  // y[m, n]
  static constexpr int R = 1;
  static constexpr bool kResidual = false;
  float* y;
  int64_t N;
  __device__ void rows(int64_t p, int64_t (&r)[R]) const { r[0] = p; }
  template <int M>
  __device__ void emit(int64_t p, const float (&v)[R][M]) const {
#pragma unroll
    for (int m = 0; m < M; ++m) y[m * N + p] = v[0][m];
  }
};
struct EpiResidual {  // res[m, n] += y; ss[m, block] = the block's sum of the new squares (the kernel)
  static constexpr int R = 1;
  static constexpr bool kResidual = true;
  float* res;
  float* ss;
  int64_t N;
  __device__ void rows(int64_t p, int64_t (&r)[R]) const { r[0] = p; }
};
struct EpiSwiglu {  // rows i (gate) and F + i (up): h[m, i] = silu(gate) * up
  static constexpr int R = 2;
  static constexpr bool kResidual = false;
  bf16* h;
  int64_t F;
  __device__ void rows(int64_t p, int64_t (&r)[R]) const {
    r[0] = p;
    r[1] = p + F;
  }
  template <int M>
  __device__ void emit(int64_t p, const float (&v)[R][M]) const {
#pragma unroll
    for (int m = 0; m < M; ++m) h[m * F + p] = __float2bfloat16(v[0][m] / (1.0f + __expf(-v[0][m])) * v[1][m]);
  }
};
struct EpiRope {  // rotary pair p: head p / half, columns i and i + half of it
  static constexpr int R = 2;
  static constexpr bool kResidual = false;
  const bf16* bias;
  const int32_t* pos;
  const int32_t* row;
  const float* inv_freq;
  int64_t n_heads;
  PagedKv kv;
  bf16* q;
  __device__ void rows(int64_t p, int64_t (&r)[R]) const {
    const int half = kv.head_dim / 2;
    r[0] = (p / half) * kv.head_dim + p % half;
    r[1] = r[0] + half;
  }
  template <int M>
  __device__ void emit(int64_t p, const float (&v)[R][M]) const {
    const int half = kv.head_dim / 2;
#pragma unroll
    for (int m = 0; m < M; ++m)
      rope_emit(m, static_cast<int>(p / half), static_cast<int>(p % half), v[0][m], v[1][m], bias, pos, row, inv_freq, n_heads, kv, q);
  }
};

// Tasks a warp takes: one for BF16; for NF4 / Q8 several, so each x chunk a lane reads (32 or 16
// elements for 16 bytes of weights) serves four weight rows: at one row a warp, reading x from L1
// cost more than the 4-bit weights from HBM (154 tok/s for NF4 Llama-2-7B, 14% of its floor).
// The rows a warp takes for NF4 / Q8 at M = 1 (FERRY_GPU_QROWS: 1, 2 or 4; default 4), at M = 2 two.
int quant_rows_per_warp(int64_t M) {
  static const int rows = [] {
    const char* e = std::getenv("FERRY_GPU_QROWS");
    const int v = e ? std::atoi(e) : 4;
    return v == 1 || v == 2 || v == 4 ? v : 4;
  }();
  return M == 1 ? rows : 2;
}
// Tasks (of R rows) a warp takes.
int groups_for(DType w, int R, int64_t M) { return w == DType::kBF16 ? 1 : std::max(1, quant_rows_per_warp(M) / R); }
// Weight chunks in flight per row and lane: four for BF16; for NF4 / Q8 two, one when a warp streams
// four rows (fewer registers: three blocks an SM; at two, 128 registers, the NF4 GEMV issued on 46%
// of cycles, ncu on the H200).
template <int kFmt, int NR>
constexpr int kInFlight = kFmt == kFmtBf16 ? 4 : NR < 4 ? 2 : 1;
template <int kFmt, int M>
constexpr int kMinBlocks = kFmt == kFmtBf16 || M > 1 ? 2 : 3;

// `qs`: NF4's absmax per block of 64 (fp32, or NF4-DQ's codes), Q8's per row (none for BF16), of a
// weight with `rows_total` rows.
template <int M, int kSrc, class Epi, int kFmt, int G>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, kMinBlocks<kFmt, M>) gemv_kernel(GemvIn in, const uint8_t* __restrict__ w, QScales qs,
                                                                    int64_t n_tasks, int64_t K, Epi epi) {
  constexpr int R = Epi::R, E = kChunkElems<kFmt>, NR = G * R, U = kInFlight<kFmt, NR>;
  __shared__ float red[32];
  __shared__ float lut[16];
  __shared__ float dmap[kFmt == kFmtNf4 ? 256 : 1];
  const bool dq = kFmt == kFmtNf4 && qs.codes != nullptr;
  if constexpr (kFmt == kFmtNf4) {
    if (threadIdx.x < 16) lut[threadIdx.x] = c_nf4[threadIdx.x];
    if (dq)
      for (int i = threadIdx.x; i < 256; i += blockDim.x) dmap[i] = c_dmap.v[i];
    __syncthreads();
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t p0 = (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp) * G;
  bool active[G];
  int64_t rows[NR];  // task g's rows at [g * R, g * R + R)
#pragma unroll
  for (int g = 0; g < G; ++g) {
    active[g] = p0 + g < n_tasks;
    int64_t r[R];
    epi.rows(active[g] ? p0 + g : 0, r);
#pragma unroll
    for (int i = 0; i < R; ++i) rows[g * R + i] = r[i];
  }
  const bool any = active[0];
  const int64_t chunks = K / E;  // K % E == 0 (checked by the launcher)
  const uint4* wr[NR];
#pragma unroll
  for (int r = 0; r < NR; ++r) wr[r] = reinterpret_cast<const uint4*>(w) + rows[r] * chunks;
  // NF4: chunk c of row r has absmax i = rows[r] * chunks / 2 + c / 2; NF4-DQ's is map[code i] *
  // absmax2[i / 256] + mean[i / 256], rounded twice as bitsandbytes' dequantisation does. The part
  // read from HBM (the fp32 absmax, or the 8-bit code) is loaded with the weights, a chunk ahead
  // (scale_raw); scale_of finishes it when the chunk's products are summed (absmax2 and the means
  // change every 256 blocks: L1 hits).
  auto scale_raw = [&](int r, int64_t c) -> uint32_t {
    if constexpr (kFmt == kFmtNf4) {
      const int64_t i = rows[r] * (chunks / 2) + c / 2;
      return dq ? static_cast<uint32_t>(__ldg(qs.codes + i)) : __float_as_uint(__ldg(qs.f32 + i));
    } else {
      return 0u;
    }
  };
  auto scale_of = [&](int r, int64_t c, uint32_t raw) -> float {
    if constexpr (kFmt == kFmtNf4) {
      if (!dq) return __uint_as_float(raw);
      const int64_t b = (rows[r] * (chunks / 2) + c / 2) >> 8;
      return dq_absmax(dmap[raw], __ldg(qs.a2 + b), __ldg(qs.means + b));
    } else {
      return 1.0f;
    }
  };
  float acc[NR][M];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
  // Software-pipelined: the next U chunks of each row are in flight while this U's products run.
  // The first are loaded before pdl_wait(): launched programmatically (resident weights), the
  // weight stream starts while the kernel before still runs; x and the outputs are touched only
  // after it.
  constexpr int kAhead = 32 * (U - 1);
  int64_t c = lane;
  uint4 wv[NR][U];
  uint32_t sv[NR][U];  // the chunks' scales as read (scale_raw)
  if (any && c + kAhead < chunks) {
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        wv[r][u] = __ldcs(wr[r] + c + 32 * u);  // streamed once: do not keep in L2
        sv[r][u] = scale_raw(r, c + 32 * u);
      }
  }
  pdl_wait();
  float inv[M];
  if constexpr (kSrc == kSrcNorm) {  // every thread: rsqrt(mean square + eps) of each row, summed in a fixed order
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float s = 0.0f;
      for (int64_t j = threadIdx.x; j < in.n_ss; j += blockDim.x) s += in.ss[m * in.n_ss + j];
      inv[m] = rsqrtf(block_sum(s, red) / static_cast<float>(K) + in.eps);
    }
  }
  if (any) {
    while (c + kAhead < chunks) {
      uint4 cur[NR][U];
      uint32_t scur[NR][U];
#pragma unroll
      for (int r = 0; r < NR; ++r)
#pragma unroll
        for (int u = 0; u < U; ++u) {
          cur[r][u] = wv[r][u];
          scur[r][u] = sv[r][u];
        }
      const int64_t next = c + 32 * U;
      if (next + kAhead < chunks) {
#pragma unroll
        for (int r = 0; r < NR; ++r)
#pragma unroll
          for (int u = 0; u < U; ++u) {
            wv[r][u] = __ldcs(wr[r] + next + 32 * u);
            sv[r][u] = scale_raw(r, next + 32 * u);
          }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float sc[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) sc[r] = scale_of(r, c + 32 * u, scur[r][u]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if constexpr (kFmt == kFmtBf16) {  // x converted once for all rows
            float xf[8];
            load_x8<kSrc>(in, K, m, c + 32 * u, xf);
#pragma unroll
            for (int r = 0; r < NR; ++r) fma8(cur[r][u], xf, acc[r][m]);
          } else {
            chunk_dots<kFmt, kSrc, NR>(in, K, m, c + 32 * u, cur, u, sc, lut, acc);
          }
        }
      }
      c = next;
    }
    for (; c < chunks; c += 32) {
      uint4 wt[NR][U];
      float sc[NR];
#pragma unroll
      for (int r = 0; r < NR; ++r) {
        wt[r][0] = __ldcs(wr[r] + c);
        sc[r] = scale_of(r, c, scale_raw(r, c));
      }
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if constexpr (kFmt == kFmtBf16) {
          float xf[8];
          load_x8<kSrc>(in, K, m, c, xf);
#pragma unroll
          for (int r = 0; r < NR; ++r) fma8(wt[r][0], xf, acc[r][m]);
        } else {
          chunk_dots<kFmt, kSrc, NR>(in, K, m, c, wt, 0, sc, lut, acc);
        }
      }
    }
  }
  // Every block has passed its weight loads: the next kernel may launch and start its own.
  pdl_launch_dependents();
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    float row_scale = 1.0f;
    if constexpr (kFmt == kFmtQ8) row_scale = any ? __ldg(qs.f32 + rows[r]) : 0.0f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      acc[r][m] = warp_sum(acc[r][m]);
      if constexpr (kFmt == kFmtQ8) acc[r][m] *= row_scale;
      if constexpr (kSrc == kSrcNorm) acc[r][m] *= inv[m];
    }
  }
  if constexpr (Epi::kResidual) {
    // The new residual, and this block's part of each row's sum of squares (fixed order: deterministic).
    __shared__ float sq[M][kWarpsPerBlock];
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float s = 0.0f;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (!active[g]) continue;
          const float v = epi.res[m * epi.N + p0 + g] + acc[g][m];
          epi.res[m * epi.N + p0 + g] = v;
          s += v * v;
        }
        sq[m][warp] = s;
      }
    }
    __syncthreads();
    if (threadIdx.x < M) {
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < kWarpsPerBlock; ++i) s += sq[threadIdx.x][i];
      epi.ss[threadIdx.x * gridDim.x + blockIdx.x] = s;
    }
  } else {
    if (lane == 0) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (!active[g]) continue;
        float v[R][M];
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int m = 0; m < M; ++m) v[i][m] = acc[g * R + i][m];
        epi.template emit<M>(p0 + g, v);
      }
    }
  }
}

// Launches a GEMV kernel; over resident weights (`fixed`) with programmatic stream serialization, so
// it may start streaming them while the kernel before it runs (sm_90+).
template <class... P, class... A>
void launch_gemv(void (*kernel)(P...), int64_t grid, int block, int smem, bool fixed, cudaStream_t s, A&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(static_cast<unsigned>(block));
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = s;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = fixed && programmatic_launch() ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...));
}

// NF4 / NF4-DQ through the tensor cores (mma.sync m16n8k16, BF16 or FP16 in, FP32 accumulation; sm_80+).
// The CUDA-core kernel above spends a shared-memory lookup, a byte extraction and an FMA on every
// weight; ncu on the H200 (Llama-3-70B's QKV shape) shows its L1 data pipe 75% busy: 32 lookups and
// ~23 other wavefronts per 512 bytes of codes. Here a row tile is 16 weight rows (the MMA's A rows)
// whose K `split` warps share in units of 256 codes (unit u to the tile's warp u % split; a group of
// 8 / split tiles takes a block's 8 warps; mma_split). The grid is two blocks an SM, each taking every
// grid-th group (mma_grid), so its code table is built once and its stages run on across groups
// (a block a group rebuilt the table and refilled the stages for every 16 or 32 rows). Each warp streams its units
// through a ring of shared-memory stages with cp.async (16 rows x 128 bytes of codes, swizzled so the
// fragment reads hit every bank once; the 16 rows' 4 scales; its x columns' 256 elements), so the
// next stages are in flight without holding registers. For each block of 64 codes lane (g, t) =
// (lane / 4, lane % 4) reads 8 bytes of rows g and g + 8: 16 codes, i.e. four MMAs' A registers,
// each register one byte = one code pair looked up in shared memory as two BF16 values (16 lookups a
// 512 bytes where the CUDA-core kernel makes 32). The dot product is a sum over k, so the MMA's k
// slots may stand for any elements as long as A and B agree: lane t's slots 2t, 2t+1 (2t+8, 2t+9) of
// MMA i hold elements 16t + 4i + {0, 1} ({2, 3}) of the block, and B's are the x words of the same
// elements, x row c in column c (hi + lo input: lo row c in column M + c; lanes of other groups
// read the last column's words, which reach only D columns nobody reads). The four MMAs of a block
// share one absmax per row, applied to their sum in FP32. The warps' partial sums meet in shared
// memory in a fixed order (deterministic). NF4 and NF4-DQ are separate instantiations (kDq): one
// body holding both cost 397 SASS instructions a unit against 242 / 312 (run92-93).
// The code values are BF16 (2^-9 relative, as bitsandbytes' dequantisation to BF16 rounds each
// weight), or FP16 (2^-11; kF16) for FP16 hi + lo rows: the QKV's (GemvIn::f16, nf4_f16_path), whose
// rounding the attention scores feel most; with BF16 code values there the golden NF4 logits moved
// 2.26e-2, past the GPU's 2e-2 (run97), with FP16 1.47e-2 (run98; the CUDA-core kernel's FP32 code
// values 1.65e-2). Other `precise` products keep the CUDA-core kernel.
// The code table holds, for each byte, the pair (code[hi nibble], code[lo nibble]) once per lane
// (entry-major: lane l reads bank l, no conflicts), 128 bytes an entry (32 KB; a PRMT and a shift
// form an address), or with one column of x 256 (64 KB, the lanes' copies in the first 128: one
// PRMT; Llama-2-7B NF4 decode 335.7 against 321.3 tok/s, run63; above one column the larger table
// leaves room for one block an SM). NF4 over large matrices keeps the 32 KB one even at one column
// (wide_table). ncu (run94): 4 warps a scheduler issuing every 2-3 cycles; NF4's largest stall is the
// wait for its stages (long scoreboard), NF4-DQ's the shared-memory queue (MIO throttle).
constexpr int kMmaWarps = 8, kMmaMaxCols = 4;
// kWide: entries 256 bytes apart (lanes' copies in the first 128), so one PRMT forms an address.
template <bool kWide>
constexpr int kMmaLutBytes = 256 * (kWide ? 256 : 128);
// One warp's stage: codes [16 rows][128 bytes], scales [16 rows][16 bytes] (4 fp32 absmax, or 4
// NF4-DQ codes), x [NC columns][256 elements + 8 (bank padding)].
template <int NC>
constexpr int kStageBytes = 2048 + 256 + NC * 528;
// Stages a warp cycles through: what fits beside the table at two blocks an SM (H100/H200: 228 KB
// of shared memory an SM, 1 KB of it reserved per block, 0.5-3 KB static here: the NF4-DQ code map
// and the warps' partial sums; launch_mma_fmt warns if two blocks do not fit).
template <int NC, bool kWide>
constexpr int kStages = std::clamp((111 * 1024 + 512 - kMmaLutBytes<kWide>) / (kMmaWarps * kStageBytes<NC>), 2, 6);
template <int NC, bool kWide>
constexpr int kMmaSmem = kMmaLutBytes<kWide> + kMmaWarps * kStages<NC, kWide> * kStageBytes<NC>;

__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}
__device__ __forceinline__ uint32_t f16_pair(float lo, float hi) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) | (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
}
// D += A B, A and B BF16 or (kF16) FP16 pairs.
template <bool kF16 = false>
__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kF16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // launched only on sm_80+ (nf4_mma_path)
#endif
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
template <int kBytes>
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kBytes == 16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
  else asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(src), "n"(kBytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
// Byte `pos` of `w` as the byte offset of its table entry for this lane: entry * 256 + lane * 4
// (kWide), or entry * 128 + lane * 4 as (byte << 8 | lane * 8) >> 1.
template <bool kWide>
__device__ __forceinline__ uint32_t lut_offset(uint32_t w, int pos, uint32_t lane_part) {
  const uint32_t o = __byte_perm(w, lane_part, 0x5504u | (static_cast<uint32_t>(pos) << 4));
  if constexpr (kWide) return o;  // lane_part = lane * 4
  else return o >> 1;             // lane_part = lane * 8
}
// Where 16-byte chunk c (0-7) of stage row r lives: chunks swizzled by the row so that the fragment
// reads (rows g = 0-3 or 4-7, two chunks each) fall in distinct banks.
__device__ __forceinline__ int chunk_at(int r, int c) { return r * 128 + 16 * (c ^ ((r & 3) << 1)); }

template <int M, bool kHiLo, bool kWide, bool kDq, bool kF16, class Epi>
__global__ void __launch_bounds__(kMmaWarps * 32, 2) nf4_mma_kernel(GemvIn in, const uint8_t* __restrict__ w, QScales qs, int64_t n_tasks,
                                                                   int64_t K, int split, int64_t n_groups, Epi epi) {
  constexpr int R = Epi::R, kTasks = 16 / R, NC = kHiLo ? 2 * M : M, S = kStages<NC, kWide>, SB = kStageBytes<NC>;
  static_assert(NC <= kMmaMaxCols, "at most 4 columns of x");
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* lut = smem;
  unsigned char* after_lut = smem + kMmaLutBytes<kWide>;  // the warps' stages
  __shared__ float dmap[256];
  __shared__ float part[kMmaWarps][16][M];  // the warps' partial sums of a group's tiles (hi + lo folded)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  unsigned char* stages = after_lut + warp * S * SB;
  constexpr bool dq = kDq;  // NF4-DQ (qs.codes), else NF4 (qs.f32): a parameter, so neither pays for the other's branches
  // A group is 8 / split row tiles of 16 rows, `split` warps each (warp wk of a tile takes units wk +
  // split j). The block takes groups blockIdx.x, + gridDim.x, ...: its warps' stages run on from one
  // group's units into the next one's, so the copies stay in flight across the groups and the code
  // table is built once a block.
  const int tpb = kMmaWarps / split, tl = warp / split, wk = warp % split;
  const int64_t n_mine = n_groups > blockIdx.x ? (n_groups - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  // Row of A slot s of group gi: task s (one row a task), or task s % 8's row s / 8.
  auto slot_row = [&](int64_t gi, int s) {
    const int64_t task0 = (gi * tpb + tl) * kTasks;
    const int ti = R == 1 ? s : s % 8;
    int64_t r[R];
    epi.rows(task0 + ti < n_tasks ? task0 + ti : 0, r);
    return r[R == 1 ? 0 : s / 8];
  };
  const int64_t nkb = K / 64, nu = K / 256, row_bytes = K / 2;
  const int nj = static_cast<int>(nu > wk ? (nu - wk + split - 1) / split : 0);  // this warp's units of a group: wk + split j
  const int64_t n_units = n_mine * nj;                                           // ... of all the block's groups
  // This lane's copies: codes of rows 4i + lane / 8 (i = 0-3), chunk lane % 8; lanes 0-15 the scales
  // of row lane; 16 bytes of each x column (lane: its 16 bytes of 512).
  // copy_w and copy_x are called for the block's units 0, 1, 2, ... in that order: each keeps its
  // sources at the next unit's (a step of `split` units, or the next group's first).
  const uint8_t* csrc[4];
  const uint8_t* scodes = nullptr;
  const float* sf32 = nullptr;
  int64_t wg = blockIdx.x;  // the group copy_w is in, and its units issued so far
  int wj = 0;
  auto w_sources = [&](int64_t gi) {
#pragma unroll
    for (int i = 0; i < 4; ++i) csrc[i] = w + slot_row(gi, 4 * i + (lane >> 3)) * row_bytes + 16 * (lane & 7) + 128 * wk;
    const int64_t sbase = slot_row(gi, lane & 15) * nkb + 4 * wk;
    if constexpr (dq) scodes = qs.codes + sbase;
    else sf32 = qs.f32 + sbase;
  };
  w_sources(wg);
  const bf16* xsrc[NC];
  int xj = 0;
  auto x_sources = [&] {
#pragma unroll
    for (int c = 0; c < NC; ++c) xsrc[c] = (kHiLo && c >= M ? in.x_lo + (c - M) * K : in.x + c * K) + 8 * lane + 256 * wk;
  };
  x_sources();
  const uint32_t st0 = smem_addr(stages);
  auto copy_w = [&](int s) {  // codes and scales of the next unit into stage s
    const uint32_t d = st0 + s * SB;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      cp_async<16>(d + chunk_at(4 * i + (lane >> 3), lane & 7), csrc[i]);
      csrc[i] += 128 * split;
    }
    if (lane < 16) {
      if constexpr (dq) cp_async<4>(d + 2048 + 16 * lane, scodes);
      else cp_async<16>(d + 2048 + 16 * lane, sf32);
    }
    if constexpr (dq) scodes += 4 * split;
    else sf32 += 4 * split;
    if (++wj == nj) {
      wj = 0;
      wg += gridDim.x;
      if (wg < n_groups) w_sources(wg);
    }
  };
  auto copy_x = [&](int s) {
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      cp_async<16>(st0 + s * SB + 2304 + c * 528 + 16 * lane, xsrc[c]);
      xsrc[c] += 256 * split;
    }
    if (++xj == nj) {
      xj = 0;
      x_sources();
    }
  };
  // The weights' first stages go out before pdl_wait() (resident weights: nobody writes them).
  for (int j = 0; j < S - 1; ++j) {
    if (j < n_units) copy_w(j);
    cp_async_commit();
  }
  // The code table: 16-byte stores, each 16 bytes of one entry's lane copies.
  for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {
    const int e = i >> 3;
    const uint32_t h = kF16 ? f16_pair(c_nf4[e >> 4], c_nf4[e & 15]) : bf16_pair(c_nf4[e >> 4], c_nf4[e & 15]);
    *reinterpret_cast<uint4*>(lut + e * (kWide ? 256 : 128) + 16 * (i & 7)) = make_uint4(h, h, h, h);
  }
  if (dq)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) dmap[i] = c_dmap.v[i];
  __syncthreads();
  pdl_wait();
  for (int j = 0; j < S - 1 && j < n_units; ++j) copy_x(j);
  cp_async_commit();
  cp_async_wait<0>();
  __syncwarp();
  const uint32_t lane_part = kWide ? 4u * lane : 8u * lane;
  // B's column is the lane's group g: lanes of groups past the last column read the last column's
  // words (no predicate, no zeroing) and feed only D columns the epilogue never reads.
  const int xoff = 2304 + (g < NC ? g : NC - 1) * 528 + 32 * t;
  // This lane's 8 bytes of block b in rows g and g + 8: chunk 2b + t / 2, half t % 2, i.e.
  // chunk_at(r, 2b + t / 2) + 8 (t % 2) = r * 128 + 32 (b ^ (r % 4)) + 8 t (r % 4 = g % 4 for both rows).
  const int cbase = g * 128 + 8 * t, cx = g & 3;
  const int et = threadIdx.x / kTasks, ti = threadIdx.x % kTasks;  // the epilogue: tile et's task ti
  const bool mine = et < tpb;
  float ss_acc[M];  // the residual's sums of squares over the block's rows
#pragma unroll
  for (int m = 0; m < M; ++m) ss_acc[m] = 0.0f;
  int s = 0;
  int64_t q = 0;  // the block's unit
  for (int64_t gn = 0; gn < n_mine; ++gn) {
    const int64_t gi = blockIdx.x + gn * gridDim.x;
    int64_t drow[2] = {0, 0};  // NF4-DQ: rows g, g + 8's first code
    if constexpr (dq) {
      drow[0] = slot_row(gi, g) * nkb;
      drow[1] = slot_row(gi, g + 8) * nkb;
    }
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < nj; ++j, ++q) {
      if (q > 0) {
        cp_async_wait<S - 2>();  // unit q's group is done
        __syncwarp();            // and every lane's part of it, and every lane is past unit q - 1's stage
      }
      {
        const int sn = s == 0 ? S - 1 : s - 1;  // into the stage unit q - 1 used
        if (q + S - 1 < n_units) {
          copy_w(sn);
          copy_x(sn);
        }
        cp_async_commit();
      }
      const unsigned char* st = stages + s * SB;
      uint32_t dcodes[2] = {0u, 0u};  // NF4-DQ: the unit's 4 codes of rows g, g + 8, their absmax2 and means
      float da2[2] = {0.0f, 0.0f}, dmean[2] = {0.0f, 0.0f};
      float4 f32s[2];  // NF4: the unit's 4 absmax of rows g, g + 8
      if constexpr (dq) {
        const int64_t u4 = 4 * (wk + static_cast<int64_t>(split) * j);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          dcodes[h] = *reinterpret_cast<const uint32_t*>(st + 2048 + 16 * (g + 8 * h));
          const int64_t b2 = (drow[h] + u4) >> 8;  // the unit's 4 codes share their absmax2 and mean
          da2[h] = __ldg(qs.a2 + b2);
          dmean[h] = __ldg(qs.means + b2);
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) f32s[h] = *reinterpret_cast<const float4*>(st + 2048 + 16 * (g + 8 * h));
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int co = cbase + 32 * (b ^ cx);
        const uint2 w0 = *reinterpret_cast<const uint2*>(st + co), w1 = *reinterpret_cast<const uint2*>(st + co + 1024);
        const uint4 xa = *reinterpret_cast<const uint4*>(st + xoff + 128 * b), xb = *reinterpret_cast<const uint4*>(st + xoff + 128 * b + 16);
        const uint32_t xw[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        float d0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d1[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // two chains of MMAs
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t r0 = i < 2 ? w0.x : w0.y, r1 = i < 2 ? w1.x : w1.y;
          const int pos = 2 * (i & 1);  // byte 2i of the 8: elements 4i, 4i + 1; byte 2i + 1: 4i + 2, 4i + 3
          auto at = [&](uint32_t word, int p) { return *reinterpret_cast<const uint32_t*>(lut + lut_offset<kWide>(word, p, lane_part)); };
          float(&d)[4] = i & 1 ? d1 : d0;
          mma_bf16<kF16>(d, at(r0, pos), at(r1, pos), at(r0, pos + 1), at(r1, pos + 1), xw[2 * i], xw[2 * i + 1]);
        }
        float sc[2];
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if constexpr (dq) sc[h] = dq_absmax(dmap[(dcodes[h] >> (8 * b)) & 0xffu], da2[h], dmean[h]);
          else sc[h] = b == 0 ? f32s[h].x : b == 1 ? f32s[h].y : b == 2 ? f32s[h].z : f32s[h].w;
        acc[0] = fmaf(sc[0], d0[0] + d1[0], acc[0]);
        acc[1] = fmaf(sc[0], d0[1] + d1[1], acc[1]);
        acc[2] = fmaf(sc[1], d0[2] + d1[2], acc[2]);
        acc[3] = fmaf(sc[1], d0[3] + d1[3], acc[3]);
      }
      s = s + 1 == S ? 0 : s + 1;
    }
    // The group's tiles: every warp's partial sums into `part`, then each task's sum over its tile's
    // warps in a fixed order (deterministic). The barrier before the writes: the previous group's
    // epilogue has read `part`.
    if (gn > 0) __syncthreads();
    // D: (row g, columns 2t, 2t + 1) and (row g + 8, the same columns); hi + lo input: column c's lo
    // part is column M + c, in lane t + (M + c % 2) / 2 of the same row group (a shuffle).
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        float a = acc[2 * h + cc];
        if constexpr (kHiLo) a += __shfl_down_sync(0xffffffffu, acc[2 * h + (M + cc) % 2], (M + cc) / 2);
        if (2 * t + cc < M) part[warp][g + 8 * h][2 * t + cc] = a;
      }
    __syncthreads();
    const int64_t task = (gi * tpb + et) * kTasks + ti;
    const bool active = mine && task < n_tasks;
    float v[R][M];
    if (mine) {
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int r = R == 1 ? ti : ti + 8 * i;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float a = 0.0f;
          for (int k = 0; k < split; ++k) a += part[et * split + k][r][m];
          v[i][m] = a;
        }
      }
    }
    if constexpr (Epi::kResidual) {
      if (active) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float nv = epi.res[m * epi.N + task] + v[0][m];
          epi.res[m * epi.N + task] = nv;
          ss_acc[m] = fmaf(nv, nv, ss_acc[m]);
        }
      }
    } else {
      if (active) epi.template emit<M>(task, v);
    }
  }
  pdl_launch_dependents();
  cp_async_wait<0>();  // (only empty groups remain)
  if constexpr (Epi::kResidual) {  // the block's sums of squares, through `part` once its last reader is done
    constexpr int kN = 2 * kTasks;  // >= tpb * kTasks
    static_assert(M * kN <= kMmaWarps * 16 * M);
    float* sq = &part[0][0][0];
    __syncthreads();
    if (mine)
#pragma unroll
      for (int m = 0; m < M; ++m) sq[m * kN + threadIdx.x] = ss_acc[m];
    __syncthreads();
    if (threadIdx.x < M) {
      float sum = 0.0f;
      for (int i = 0; i < tpb * kTasks; ++i) sum += sq[threadIdx.x * kN + i];
      epi.ss[threadIdx.x * gridDim.x + blockIdx.x] = sum;
    }
  }
}

// Warps that split a row tile's K: 4 (blocks of two tiles, each warp twice the units: less pipeline
// ramp) for matrices of 16384 rows or more, which still give every SM several blocks; 8 below, where
// halving the blocks costs more (H200, bench_gpu_gemv: Llama-3-70B's gate_up 60% of HBM at 4 against
// 58% at 8, lm_head 65 / 61, NF4-DQ 50 / 44 and 53 / 46; its QKV 35 / 40, down 56 / 60; Llama-2-7B's
// alike). FERRY_GPU_NF4_SPLIT=4|8 overrides (timing).
int mma_split(int64_t rows) {
  static const int forced = [] {
    const char* e = std::getenv("FERRY_GPU_NF4_SPLIT");
    const int v = e ? std::atoi(e) : 0;
    return v == 4 || v == 8 ? v : 0;
  }();
  return forced ? forced : rows >= 16384 ? 4 : 8;
}

// The tensor-core kernel's grid for `groups` row-tile groups: two blocks an SM, each taking every
// grid-th group, so a block builds its code table once and its stages run on from group to group
// (FERRY_GPU_NF4_PERSIST=0: a block a group, as before; timing).
int64_t& mma_grid_cap() {  // -1: two blocks an SM; 0: a block a group; else at most that many blocks (set_nf4_grid_cap)
  static int64_t cap = [] {
    const char* e = std::getenv("FERRY_GPU_NF4_PERSIST");
    return e && std::string(e) == "0" ? int64_t{0} : int64_t{-1};
  }();
  return cap;
}
int64_t mma_grid(int64_t groups) {
  static const int64_t two_an_sm = [] {
    int dev = 0, sms = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return int64_t{0};
    }
    return int64_t{2} * sms;
  }();
  const int64_t cap = mma_grid_cap() < 0 ? two_an_sm : mma_grid_cap();
  return cap > 0 ? std::min(groups, cap) : groups;
}

template <int M, bool kHiLo, bool kWide, bool kDq, bool kF16, class Epi>
void launch_mma_fmt(const GemvIn& in, const QScales& qs, const uint8_t* w, int64_t rows_total, int64_t n_tasks, int64_t K, const Epi& epi,
                    bool weights_fixed, cudaStream_t s) {
  constexpr int smem = kMmaSmem<kHiLo ? 2 * M : M, kWide>;
  static const bool attr = [] {  // above 48 KB of dynamic shared memory is an opt-in, once per kernel
    const auto kernel = nf4_mma_kernel<M, kHiLo, kWide, kDq, kF16, Epi>;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    // The stages are sized for two blocks an SM; one would halve the copies in flight.
    int blocks = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kMmaWarps * 32, smem));
    if (blocks < 2)
      std::fprintf(stderr, "ferry: warning: the NF4 tensor-core GEMV (%d columns) fits %d block an SM, not 2: it runs at about half speed\n", M, blocks);
    return true;
  }();
  (void)attr;
  const int split = mma_split(rows_total), per_block = 16 / Epi::R * (kMmaWarps / split);
  const int64_t groups = (n_tasks + per_block - 1) / per_block;
  launch_gemv(nf4_mma_kernel<M, kHiLo, kWide, kDq, kF16, Epi>, mma_grid(groups), kMmaWarps * 32, smem, weights_fixed, s, in, w, qs, n_tasks, K, split,
              groups, epi);
}

template <int M, bool kHiLo, bool kWide, class Epi, bool kF16 = false>
void launch_mma(const GemvIn& in, const QScales& qs, const uint8_t* w, int64_t rows_total, int64_t n_tasks, int64_t K, const Epi& epi, bool weights_fixed,
                cudaStream_t s) {
  if (qs.codes) launch_mma_fmt<M, kHiLo, kWide, true, kF16>(in, qs, w, rows_total, n_tasks, K, epi, weights_fixed, s);
  else launch_mma_fmt<M, kHiLo, kWide, false, kF16>(in, qs, w, rows_total, n_tasks, K, epi, weights_fixed, s);
}

QScales quant_scales(const GemvW& w, int64_t rows_total, int64_t K) {
  QScales qs;
  const uint8_t* base = static_cast<const uint8_t*>(w.p);
  const QuantLayout l = quant_layout(w.dt, rows_total, K);
  if (w.dt == DType::kNF4DQ) {
    qs.codes = base + l.scales;
    qs.a2 = reinterpret_cast<const float*>(base + l.scales2);
    qs.means = reinterpret_cast<const float*>(base + l.means);
  } else {
    qs.f32 = reinterpret_cast<const float*>(base + l.scales);
  }
  return qs;
}

// The tensor-core kernel's shared memory for NC columns of x (the wide table for one column), plus
// its static part: sized for two blocks an SM on H100 / H200 (228 KB an SM).
int mma_smem_bytes(int nc) {
  const int dyn = nc == 1 ? kMmaSmem<1, true> : nc == 2 ? kMmaSmem<2, false> : nc == 3 ? kMmaSmem<3, false> : kMmaSmem<4, false>;
  return dyn + 1024 + kMmaWarps * 16 * nc * 4;  // static: NF4-DQ's code map, the warps' partial sums
}

// sm_80+, FERRY_GPU_NF4_MMA not 0, and the device's shared memory an SM holds two of the largest
// block (H100 / H200: 228 KB; GPUs with ~100 KB an SM keep the CUDA-core kernel).
bool mma_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FERRY_GPU_NF4_MMA");
    if (e && std::string(e) == "0") return false;
    int dev = 0, major = 0, per_block = 0, per_sm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess)
      return false;
    int need = 0;
    for (int nc = 1; nc <= kMmaMaxCols; ++nc) need = std::max(need, mma_smem_bytes(nc));
    return major >= 8 && per_block >= need && per_sm >= 2 * need;
  }();
  return on;
}

template <int M, int kSrc, int kFmt, int G, class Epi>
void launch_fmt(const GemvIn& in, const GemvW& w, int64_t rows_total, int64_t n_tasks, int64_t K, const Epi& epi, bool weights_fixed,
                cudaStream_t s) {
  QScales qs;
  if constexpr (kFmt != kFmtBf16) qs = quant_scales(w, rows_total, K);
  launch_gemv(gemv_kernel<M, kSrc, Epi, kFmt, G>, (n_tasks + kWarpsPerBlock * G - 1) / (kWarpsPerBlock * G), kWarpsPerBlock * 32, 0, weights_fixed, s,
              in, static_cast<const uint8_t*>(w.p), qs, n_tasks, K, epi);
}

// A quantised format's launch with G tasks a warp (M * R * G <= 4 rows of products a warp).
template <int M, int kSrc, int kFmt, class Epi>
void launch_groups(const GemvIn& in, const GemvW& w, int64_t rows_total, int64_t n_tasks, int64_t K, const Epi& epi, bool fixed, cudaStream_t s) {
  const int g = groups_for(w.dt, Epi::R, M);
  if constexpr (M * Epi::R <= 1) {
    if (g >= 4) return launch_fmt<M, kSrc, kFmt, 4>(in, w, rows_total, n_tasks, K, epi, fixed, s);
  }
  if constexpr (M * Epi::R <= 2) {
    if (g >= 2) return launch_fmt<M, kSrc, kFmt, 2>(in, w, rows_total, n_tasks, K, epi, fixed, s);
  }
  launch_fmt<M, kSrc, kFmt, 1>(in, w, rows_total, n_tasks, K, epi, fixed, s);
}

// FP16 hi + lo QKV rows on the tensor cores (nf4_f16_path): on unless FERRY_GPU_QKV_F16=0.
bool fp16_qkv_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("FERRY_GPU_QKV_F16");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// The one-column table choice: -1 by size and format (wide_table), 0 the 32 KB table, 1 the 64 KB one
// (FERRY_GPU_NF4_WIDE=0|1, or set_nf4_table).
int& nf4_table_mode() {
  static int mode = [] {
    const char* e = std::getenv("FERRY_GPU_NF4_WIDE");
    return e && std::string(e) == "0" ? 0 : e && std::string(e) == "1" ? 1 : -1;
  }();
  return mode;
}

// Whether a one-column tensor-core GEMV over `elems` weights of format `dt` takes the wide table (below).
bool wide_table(DType dt, int64_t elems) {
  if (const int m = nf4_table_mode(); m >= 0) return m == 1;
  return dt == DType::kNF4DQ || elems < (int64_t{1} << 27);
}

template <int M, int kSrc, class Epi>
void launch(const GemvIn& in, const GemvW& w, int64_t rows_total, int64_t n_tasks, int64_t K, const Epi& epi, bool weights_fixed, cudaStream_t s) {
  if constexpr (kSrc != kSrcNorm && (kSrc == kSrcHiLo ? 2 * M : M) <= kMmaMaxCols) {
    if ((!w.precise || in.f16) && K % 256 == 0 && nf4_mma_path(w.dt, M, kSrc == kSrcHiLo)) {
      const QScales qs = quant_scales(w, rows_total, K);
      const uint8_t* p = static_cast<const uint8_t*>(w.p);
      if (in.f16) {  // FP16 hi + lo rows (the QKV's): FP16 code values, precise enough for it
        if constexpr (kSrc == kSrcHiLo && (std::is_same_v<Epi, EpiRope> || std::is_same_v<Epi, EpiStore>)) {
          return launch_mma<M, true, false, Epi, true>(in, qs, p, rows_total, n_tasks, K, epi, weights_fixed, s);
        } else {
          throw CudaError("gemv: FP16 rows are taken as hi + lo parts by the stored or RoPE GEMV only");
        }
      }
      // One column of x takes the wide table (64 KB: one PRMT a lookup, two stages a warp) except for
      // NF4 over large matrices, where the 32 KB table's third stage wins (bench_gpu_gemv on the H200,
      // run95: Llama-3-70B's gate_up 62 -> 66% of HBM, down 63 -> 66, lm_head 66 -> 71; NF4-DQ and
      // matrices of Llama-2-7B's size 0-14% slower with it). FERRY_GPU_NF4_WIDE=0|1 forces it.
      if constexpr (M == 1 && kSrc != kSrcHiLo) {
        if (!wide_table(w.dt, rows_total * K)) return launch_mma<M, false, false>(in, qs, p, rows_total, n_tasks, K, epi, weights_fixed, s);
        return launch_mma<M, false, true>(in, qs, p, rows_total, n_tasks, K, epi, weights_fixed, s);
      }
      launch_mma<M, kSrc == kSrcHiLo, false>(in, qs, p, rows_total, n_tasks, K, epi, weights_fixed, s);
      return;
    }
  }
  if (in.f16) throw CudaError("gemv: FP16 rows need the tensor-core NF4 kernel (NF4 / NF4-DQ weights, K % 256 == 0, up to 4 columns; nf4_f16_path)");
  if constexpr (Epi::kResidual) {
    // gemv_ss_parts counts the tensor-core kernel's blocks where it takes decode's BF16 rows: any other
    // input that kernel would take is refused, not miscounted.
    if (K % 256 == 0 && nf4_mma_path(w.dt, M, false) && (kSrc != kSrcBf16 || w.precise))
      throw CudaError("gemv_residual: with NF4 weights the input must be BF16 rows and the codes not `precise`");
  }
  if (is_nf4(w.dt)) launch_groups<M, kSrc, kFmtNf4>(in, w, rows_total, n_tasks, K, epi, weights_fixed, s);
  else if (w.dt == DType::kQ8) launch_groups<M, kSrc, kFmtQ8>(in, w, rows_total, n_tasks, K, epi, weights_fixed, s);
  else launch_fmt<M, kSrc, kFmtBf16, 1>(in, w, rows_total, n_tasks, K, epi, weights_fixed, s);
}

// The source kind of `in` (the launchers check the fields agree with M, K).
int source_of(const GemvIn& in) { return in.res ? kSrcNorm : in.x_lo ? kSrcHiLo : kSrcBf16; }

void check(const GemvIn& in, const GemvW& w, int64_t M, int64_t K, int64_t max_rows, const char* what) {
  const int64_t mult = is_nf4(w.dt) ? 64 : w.dt == DType::kQ8 ? 16 : 8;
  if (K % mult != 0 || M < 1 || M > max_rows)
    throw CudaError(std::string(what) + ": needs K % " + std::to_string(mult) + " == 0 and 1 <= M <= " + std::to_string(max_rows));
  if (w.dt != DType::kBF16 && !is_quantized(w.dt)) throw CudaError(std::string(what) + ": weights must be BF16, NF4, NF4DQ or Q8");
  if (in.res ? (in.g == nullptr || in.ss == nullptr || in.n_ss < 1) : in.x == nullptr)
    throw CudaError(std::string(what) + ": the input needs x, or res with g and ss");
  if (in.res && reinterpret_cast<uintptr_t>(in.g) % 16 != 0) throw CudaError(std::string(what) + ": g must be 16-byte aligned");
}

// Dispatch over the fused row counts (1, 2) and the three sources.
template <class Epi>
void launch_fused(const GemvIn& in, const GemvW& w, int64_t rows_total, int64_t M, int64_t n_tasks, int64_t K, const Epi& epi, bool fixed,
                  cudaStream_t s, const char* what) {
  check(in, w, M, K, kGemvFusedMaxRows, what);
  static_assert(kGemvFusedMaxRows == 2);
  const int src = source_of(in);
  if (M == 1) {
    if (src == kSrcNorm) launch<1, kSrcNorm>(in, w, rows_total, n_tasks, K, epi, fixed, s);
    else if (src == kSrcHiLo) launch<1, kSrcHiLo>(in, w, rows_total, n_tasks, K, epi, fixed, s);
    else launch<1, kSrcBf16>(in, w, rows_total, n_tasks, K, epi, fixed, s);
  } else {
    if (src == kSrcNorm) launch<2, kSrcNorm>(in, w, rows_total, n_tasks, K, epi, fixed, s);
    else if (src == kSrcHiLo) launch<2, kSrcHiLo>(in, w, rows_total, n_tasks, K, epi, fixed, s);
    else launch<2, kSrcBf16>(in, w, rows_total, n_tasks, K, epi, fixed, s);
  }
}

template <int M>
void launch_store(const GemvIn& in, const GemvW& w, float* y, int64_t N, int64_t K, bool fixed, cudaStream_t s) {
  const EpiStore epi{y, N};
  if (in.x_lo) launch<M, kSrcHiLo>(in, w, N, N, K, epi, fixed, s);
  else launch<M, kSrcBf16>(in, w, N, N, K, epi, fixed, s);
}

}  // namespace

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

void gemv(const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s, bool weights_fixed, const bf16* x_lo) {
  gemv_store(GemvIn{x, x_lo}, GemvW{w, DType::kBF16}, y, M, N, K, s, weights_fixed);
}

void gemv_store(const GemvIn& in, const GemvW& w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s, bool weights_fixed) {
  if (in.res) throw CudaError("gemv_store: takes x (and x_lo), not a normalised residual");
  check(in, w, M, K, kGemvMaxRows, "gemv");
  switch (M) {
    case 1: launch_store<1>(in, w, y, N, K, weights_fixed, s); break;
    case 2: launch_store<2>(in, w, y, N, K, weights_fixed, s); break;
    case 3: launch_store<3>(in, w, y, N, K, weights_fixed, s); break;
    case 4: launch_store<4>(in, w, y, N, K, weights_fixed, s); break;
    case 5: launch_store<5>(in, w, y, N, K, weights_fixed, s); break;
    case 6: launch_store<6>(in, w, y, N, K, weights_fixed, s); break;
    case 7: launch_store<7>(in, w, y, N, K, weights_fixed, s); break;
    case 8: launch_store<8>(in, w, y, N, K, weights_fixed, s); break;
    default: throw CudaError("gemv: no kernel for " + std::to_string(M) + " rows");
  }
}

bool nf4_f16_path(DType w, int64_t M, int64_t K) { return K % 256 == 0 && nf4_mma_path(w, M, true) && fp16_qkv_enabled(); }

void set_nf4_table(int mode) { nf4_table_mode() = mode < 0 ? -1 : mode > 0 ? 1 : 0; }

void set_nf4_grid_cap(int64_t blocks) { mma_grid_cap() = blocks < 0 ? -1 : blocks; }

bool nf4_mma_path(DType w, int64_t M, bool hi_lo) { return is_nf4(w) && (hi_lo ? 2 * M : M) <= kMmaMaxCols && mma_enabled(); }

int64_t gemv_ss_parts(int64_t N, DType w, int64_t M, int64_t K) {
  if (K % 256 == 0 && nf4_mma_path(w, M, false)) {  // the tensor-core kernel: 16 rows a tile, 8 / split tiles a group
    const int64_t rows = 16 * (kMmaWarps / mma_split(N));  // (the residual: N rows)
    return mma_grid((N + rows - 1) / rows);                 // a part a block
  }
  // As launch_groups picks for the residual (R = 1) at M rows.
  const int g = groups_for(w, 1, M);
  const int64_t per_block = kWarpsPerBlock * (M == 1 ? std::min(g, 4) : std::min(g, 2));
  return (N + per_block - 1) / per_block;
}

void gemv_residual(const GemvIn& in, const GemvW& w, float* res, float* ss, int64_t M, int64_t N, int64_t K, cudaStream_t s, bool weights_fixed) {
  launch_fused(in, w, N, M, N, K, EpiResidual{res, ss, N}, weights_fixed, s, "gemv_residual");
}

void gemv_swiglu(const GemvIn& in, const GemvW& w, bf16* h, int64_t M, int64_t F, int64_t K, cudaStream_t s, bool weights_fixed) {
  launch_fused(in, w, 2 * F, M, F, K, EpiSwiglu{h, F}, weights_fixed, s, "gemv_swiglu");
}

void gemv_rope_kv(const GemvIn& in, const GemvW& w, const bf16* bias, const int32_t* pos, const int32_t* row, const float* inv_freq,
                  int64_t n_heads, const PagedKv& kv, bf16* q, int64_t M, int64_t K, cudaStream_t s, bool weights_fixed) {
  if (kv.head_dim % 2 != 0) throw CudaError("gemv_rope_kv: needs an even head_dim");
  const int64_t rows = (n_heads + 2 * kv.n_kv_heads) * kv.head_dim;
  GemvW wp = w;
  wp.precise = true;  // the QKV product
  launch_fused(in, wp, rows, M, rows / 2, K, EpiRope{bias, pos, row, inv_freq, n_heads, kv, q}, weights_fixed, s, "gemv_rope_kv");
}

void gemm_f32(cublasHandle_t h, const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s, bool weights_fixed) {
  if (M <= kGemvPreferRows && K % 8 == 0) gemv(x, w, y, M, N, K, s, weights_fixed);
  else gemm(h, x, w, y, M, N, K, true);
}

}  // namespace ferry::gpu
