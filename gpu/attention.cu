// Paged causal attention for prefill and decode (flash-decoding style, CUDA cores).
//
// Grid (query tile, KV head, split), 4 warps per block. A query tile is up to 8 query rows: the GQA
// group's heads of one token (decode), or of a few consecutive tokens of one sequence (prefill), so
// each K/V row is read once for all of them. The block keeps those rows in shared memory; each warp
// walks 32-key tiles of its part of the key range: lane j scores key j against every row (masked by
// each row's causal limit), the warp updates an online softmax per row, then the warp accumulates V
// rows with each lane owning head_dim/32 output dims.
// Warps are merged in shared memory; splits (for long contexts and small batches) are merged by a
// second kernel.
#include <algorithm>
#include <cfloat>
#include <climits>

#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;  // query rows per block

template <int HD>
__device__ __forceinline__ const bf16* kv_row(const bf16* base, const PagedKv& kv, const int32_t* table, int j, int kh) {
  const int32_t block = table[j / kv.block_size];
  return base + ((static_cast<int64_t>(block) * kv.block_size + j % kv.block_size) * kv.n_kv_heads + kh) * HD;
}

template <int HD>
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(const bf16* __restrict__ q, const int32_t* __restrict__ pos,
                                                                 const int32_t* __restrict__ row, const int32_t* __restrict__ tiles,
                                                                 int n_heads, int window, PagedKv kv, int n_splits, float scale,
                                                                 float* __restrict__ scratch, bf16* __restrict__ out) {
  constexpr int DPL = HD >= 32 ? HD / 32 : 1;  // output dims per lane
  __shared__ float qs[kMaxGroup][HD];
  __shared__ float p_sh[kWarps][kMaxGroup][32];
  __shared__ float m_sh[kWarps][kMaxGroup], l_sh[kWarps][kMaxGroup];
  __shared__ float acc_sh[kWarps][kMaxGroup][HD];

  const int kh = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = n_heads / kv.n_kv_heads;
  // The tile: tokens t0 .. t0 + n_tok - 1 of one sequence; row r is token t0 + r / group, head kh * group + r % group.
  const int t0 = tiles ? tiles[2 * blockIdx.x] : blockIdx.x;
  const int n_tok = tiles ? tiles[2 * blockIdx.x + 1] : 1;
  const int g = n_tok * group;  // query rows (<= kMaxGroup)
  int lo[kMaxGroup], hi[kMaxGroup];  // each row's key range [lo, hi]
  int first = INT_MAX, last = 0;
#pragma unroll
  for (int r = 0; r < kMaxGroup; ++r) {
    const int p = r < g ? pos[t0 + r / group] : 0;
    hi[r] = r < g ? p : -1;
    lo[r] = r < g ? (window > 0 ? max(0, p - window + 1) : 0) : INT_MAX;
    if (r < g) {
      first = min(first, lo[r]);
      last = max(last, hi[r]);
    }
  }
  const int n_keys = last - first + 1;
  const int chunk = ((n_keys + n_splits - 1) / n_splits + 31) / 32 * 32;
  const int k0 = first + split * chunk;
  const int k1 = min(last + 1, k0 + chunk);
  const int32_t* table = kv.block_tables + static_cast<int64_t>(row[t0]) * kv.max_blocks;

  const int64_t q_dim = static_cast<int64_t>(n_heads) * HD;
  for (int i = threadIdx.x; i < g * HD; i += blockDim.x) {
    const int r = i / HD;
    qs[r][i % HD] = __bfloat162float(q[(t0 + r / group) * q_dim + (kh * group + r % group) * HD + i % HD]);
  }
  __syncthreads();

  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][DPL];
#pragma unroll
  for (int gi = 0; gi < kMaxGroup; ++gi) {
    m[gi] = -FLT_MAX;
    l[gi] = 0.0f;
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[gi][d] = 0.0f;
  }
  bool any = false;
  for (int tile = k0 + warp * 32; tile < k1; tile += kWarps * 32) {
    any = true;
    const int j = tile + lane;
    const bool valid = j < k1;
    float s[kMaxGroup];
#pragma unroll
    for (int gi = 0; gi < kMaxGroup; ++gi) s[gi] = 0.0f;
    if (valid) {
      const bf16* kr = kv_row<HD>(kv.k, kv, table, j, kh);
#pragma unroll
      for (int d0 = 0; d0 < HD; d0 += 8) {
        const uint4 raw = *reinterpret_cast<const uint4*>(kr + d0);
        const bf16* kb = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float kf = __bfloat162float(kb[e]);
#pragma unroll
          for (int gi = 0; gi < kMaxGroup; ++gi)
            if (gi < g) s[gi] += qs[gi][d0 + e] * kf;
        }
      }
    }
#pragma unroll
    for (int gi = 0; gi < kMaxGroup; ++gi) {
      if (gi >= g) break;
      const bool ok = valid && j >= lo[gi] && j <= hi[gi];  // this row's causal / window limits
      const float sv = ok ? s[gi] * scale : -FLT_MAX;
      const float mn = fmaxf(m[gi], warp_max(sv));
      const float corr = __expf(m[gi] - mn);
      const float pv = ok ? __expf(sv - mn) : 0.0f;
      l[gi] = l[gi] * corr + warp_sum(pv);
#pragma unroll
      for (int d = 0; d < DPL; ++d) acc[gi][d] *= corr;
      m[gi] = mn;
      p_sh[warp][gi][lane] = pv;
    }
    __syncwarp();
    const int n_valid = min(32, k1 - tile);
    // V rows in groups of 8: all 8 loads issued before their use, so the latency overlaps.
    for (int j0 = 0; j0 < n_valid; j0 += 8) {
      float vf[8][DPL];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const bool ok = j0 + u < n_valid;
        const bf16* vr = ok ? kv_row<HD>(kv.v, kv, table, tile + j0 + u, kh) : nullptr;
#pragma unroll
        for (int d = 0; d < DPL; ++d) {
          const int dim = lane * DPL + d;
          vf[u][d] = (ok && dim < HD) ? __bfloat162float(vr[dim]) : 0.0f;
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (j0 + u >= n_valid) break;
#pragma unroll
        for (int gi = 0; gi < kMaxGroup; ++gi) {
          if (gi >= g) break;
          const float pv = p_sh[warp][gi][j0 + u];
#pragma unroll
          for (int d = 0; d < DPL; ++d) acc[gi][d] += pv * vf[u][d];
        }
      }
    }
    __syncwarp();
  }
  // Merge the warps.
#pragma unroll
  for (int gi = 0; gi < kMaxGroup; ++gi) {
    if (gi >= g) break;
    if (lane == 0) {
      m_sh[warp][gi] = any ? m[gi] : -FLT_MAX;
      l_sh[warp][gi] = any ? l[gi] : 0.0f;
    }
#pragma unroll
    for (int d = 0; d < DPL; ++d)
      if (lane * DPL + d < HD) acc_sh[warp][gi][lane * DPL + d] = any ? acc[gi][d] : 0.0f;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < g * HD; i += blockDim.x) {
    const int gi = i / HD, dim = i % HD;
    float M = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, m_sh[w][gi]);
    float L = 0.0f, A = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      if (l_sh[w][gi] == 0.0f) continue;
      const float f = __expf(m_sh[w][gi] - M);
      L += l_sh[w][gi] * f;
      A += acc_sh[w][gi][dim] * f;
    }
    const int t = t0 + gi / group, h = kh * group + gi % group;
    if (n_splits == 1) {
      out[t * q_dim + h * HD + dim] = __float2bfloat16(A / L);
    } else {
      float* part = scratch + ((static_cast<int64_t>(t) * n_heads + h) * n_splits + split) * (HD + 2);
      if (dim == 0) {
        part[0] = M;
        part[1] = L;
      }
      part[2 + dim] = A;
    }
  }
}

// Grid (token * head), block head_dim threads: merges the splits' partial softmax results.
__global__ void combine_kernel(const float* __restrict__ scratch, int n_splits, int hd, bf16* __restrict__ out) {
  const int64_t th = blockIdx.x;
  const float* parts = scratch + th * n_splits * (hd + 2);
  float M = -FLT_MAX;
  for (int s = 0; s < n_splits; ++s)
    if (parts[s * (hd + 2) + 1] > 0.0f) M = fmaxf(M, parts[s * (hd + 2)]);
  float L = 0.0f, A = 0.0f;
  for (int s = 0; s < n_splits; ++s) {
    const float* pp = parts + s * (hd + 2);
    if (pp[1] == 0.0f) continue;
    const float f = __expf(pp[0] - M);
    L += pp[1] * f;
    A += pp[2 + threadIdx.x] * f;
  }
  out[th * hd + threadIdx.x] = __float2bfloat16(A / L);
}

template <int HD>
void launch(const bf16* q, const int32_t* pos, const int32_t* row, const int32_t* tiles, int64_t n_tiles, int64_t n, int64_t n_heads,
            int64_t window, const PagedKv& kv, int n_splits, float* scratch, bf16* out, cudaStream_t s) {
  dim3 grid(static_cast<unsigned>(tiles ? n_tiles : n), static_cast<unsigned>(kv.n_kv_heads), static_cast<unsigned>(n_splits));
  const float scale = 1.0f / sqrtf(static_cast<float>(HD));
  attention_kernel<HD><<<grid, kWarps * 32, 0, s>>>(q, pos, row, tiles, static_cast<int>(n_heads), static_cast<int>(window), kv,
                                                    n_splits, scale, scratch, out);
  CUDA_CHECK_LAUNCH();
  if (n_splits > 1) {
    combine_kernel<<<static_cast<unsigned>(n * n_heads), HD, 0, s>>>(scratch, n_splits, HD, out);
    CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

bool attention_supports(int64_t head_dim, int64_t group) {
  const bool hd_ok = head_dim == 8 || head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  return hd_ok && group >= 1 && group <= kMaxGroup;
}

int query_tile_tokens(int64_t n_heads, int64_t n_kv_heads) { return static_cast<int>(std::max<int64_t>(1, kMaxGroup / (n_heads / n_kv_heads))); }

void attention(const bf16* q, const int32_t* pos, const int32_t* row, const int32_t* tiles, int64_t n_tiles, int64_t n, int64_t n_heads,
               int64_t window, const PagedKv& kv, int n_splits, float* scratch, bf16* out, cudaStream_t s) {
  if (n == 0) return;
#define FERRY_ATT(HD) launch<HD>(q, pos, row, tiles, n_tiles, n, n_heads, window, kv, n_splits, scratch, out, s)
  switch (kv.head_dim) {
    case 8: return FERRY_ATT(8);
    case 16: return FERRY_ATT(16);
    case 32: return FERRY_ATT(32);
    case 64: return FERRY_ATT(64);
    case 128: return FERRY_ATT(128);
    case 256: return FERRY_ATT(256);
    default: throw CudaError("attention: unsupported head_dim " + std::to_string(kv.head_dim));
  }
#undef FERRY_ATT
}

}  // namespace ferry::gpu
