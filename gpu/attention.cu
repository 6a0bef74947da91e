// Paged causal attention for prefill and decode (flash-decoding style, CUDA cores).
//
// Grid (token, KV head, split), 4 warps per block. The block keeps the group's query heads in shared
// memory; each warp walks 32-key tiles of its part of the key range: lane j scores key j against
// every query head of the group (so each K row is read once per group), the warp updates an online
// softmax per head, then the warp accumulates V rows with each lane owning head_dim/32 output dims.
// Warps are merged in shared memory; splits (for long contexts and small batches) are merged by a
// second kernel.
#include <cfloat>

#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;

template <int HD>
__device__ __forceinline__ const bf16* kv_row(const bf16* base, const PagedKv& kv, const int32_t* table, int j, int kh) {
  const int32_t block = table[j / kv.block_size];
  return base + ((static_cast<int64_t>(block) * kv.block_size + j % kv.block_size) * kv.n_kv_heads + kh) * HD;
}

template <int HD>
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(const bf16* __restrict__ q, const int32_t* __restrict__ pos,
                                                                 const int32_t* __restrict__ row, int n_heads, int window, PagedKv kv,
                                                                 int n_splits, float scale, float* __restrict__ scratch,
                                                                 bf16* __restrict__ out) {
  constexpr int DPL = HD >= 32 ? HD / 32 : 1;  // output dims per lane
  __shared__ float qs[kMaxGroup][HD];
  __shared__ float p_sh[kWarps][kMaxGroup][32];
  __shared__ float m_sh[kWarps][kMaxGroup], l_sh[kWarps][kMaxGroup];
  __shared__ float acc_sh[kWarps][kMaxGroup][HD];

  const int t = blockIdx.x, kh = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = n_heads / kv.n_kv_heads;
  const int p = pos[t];
  const int first = window > 0 ? max(0, p - window + 1) : 0;
  const int n_keys = p - first + 1;
  const int chunk = ((n_keys + n_splits - 1) / n_splits + 31) / 32 * 32;
  const int k0 = first + split * chunk;
  const int k1 = min(p + 1, k0 + chunk);
  const int32_t* table = kv.block_tables + static_cast<int64_t>(row[t]) * kv.max_blocks;

  const int64_t q_dim = static_cast<int64_t>(n_heads) * HD;
  for (int i = threadIdx.x; i < g * HD; i += blockDim.x) qs[i / HD][i % HD] = __bfloat162float(q[t * q_dim + (kh * g) * HD + i]);
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
      const float sv = valid ? s[gi] * scale : -FLT_MAX;
      const float mn = fmaxf(m[gi], warp_max(sv));
      const float corr = __expf(m[gi] - mn);
      const float pv = valid ? __expf(sv - mn) : 0.0f;
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
    const int h = kh * g + gi;
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
void launch(const bf16* q, const int32_t* pos, const int32_t* row, int64_t n, int64_t n_heads, int64_t window, const PagedKv& kv,
            int n_splits, float* scratch, bf16* out, cudaStream_t s) {
  dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(kv.n_kv_heads), static_cast<unsigned>(n_splits));
  const float scale = 1.0f / sqrtf(static_cast<float>(HD));
  attention_kernel<HD><<<grid, kWarps * 32, 0, s>>>(q, pos, row, static_cast<int>(n_heads), static_cast<int>(window), kv, n_splits,
                                                    scale, scratch, out);
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

void attention(const bf16* q, const int32_t* pos, const int32_t* row, int64_t n, int64_t n_heads, int64_t window, const PagedKv& kv,
               int n_splits, float* scratch, bf16* out, cudaStream_t s) {
  if (n == 0) return;
  switch (kv.head_dim) {
    case 8: return launch<8>(q, pos, row, n, n_heads, window, kv, n_splits, scratch, out, s);
    case 16: return launch<16>(q, pos, row, n, n_heads, window, kv, n_splits, scratch, out, s);
    case 32: return launch<32>(q, pos, row, n, n_heads, window, kv, n_splits, scratch, out, s);
    case 64: return launch<64>(q, pos, row, n, n_heads, window, kv, n_splits, scratch, out, s);
    case 128: return launch<128>(q, pos, row, n, n_heads, window, kv, n_splits, scratch, out, s);
    case 256: return launch<256>(q, pos, row, n, n_heads, window, kv, n_splits, scratch, out, s);
    default: throw CudaError("attention: unsupported head_dim " + std::to_string(kv.head_dim));
  }
}

}  // namespace ferry::gpu
