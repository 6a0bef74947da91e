// Paged causal attention for prefill and decode.
//
// Two kernels share the query tiles the executor builds (build_query_tiles):
// - Tensor-core tiles (prefill runs of at least 16 query rows): FlashAttention-2 order on mma.sync
//   BF16 m16n8k16. A block of 4 warps holds up to 64 query rows (the GQA group's heads of up to
//   64 / group consecutive tokens of one sequence), 16 rows a warp; 32-key tiles of K and V stream
//   through shared memory in two stages (cp.async), so each K/V row is read once per tile for every
//   row. Scores and the online softmax stay in registers; P is rounded to BF16 for the second
//   product, as in FlashAttention.
// - CUDA-core tiles (decode, and runs of fewer rows; flash-decoding style): grid (query tile, KV
//   head, split), 4 warps per block. A query tile is up to 8 query rows: the GQA group's heads of one
//   token (decode), or of a few consecutive tokens of one sequence, so each K/V row is read once for
//   all of them. The block keeps those rows in shared memory; each warp walks 32-key tiles of its part
//   of the key range: lane j scores key j against every row (masked by each row's causal limit), the
//   warp updates an online softmax per row, then the warp accumulates V rows with each lane owning
//   head_dim/32 output dims. Warps are merged in shared memory; splits (for long contexts and small
//   batches) are merged by a second kernel.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "gpu/kernels.h"

namespace ferry::gpu {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;  // query rows per block

// N consecutive bf16 in one load (N = 1, 2, 4, 8), and as floats (zeros when !ok).
template <int N>
struct VecOfT {
  using T = uint4;
};
template <>
struct VecOfT<4> {
  using T = uint2;
};
template <>
struct VecOfT<2> {
  using T = uint32_t;
};
template <>
struct VecOfT<1> {
  using T = uint16_t;
};
template <int N>
using VecOf = typename VecOfT<N>::T;
template <int N>
__device__ __forceinline__ void unpack_bf16(const VecOf<N>& v, bool ok, float (&f)[N]) {
  const bf16* b = reinterpret_cast<const bf16*>(&v);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = ok ? __bfloat162float(b[i]) : 0.0f;
}

template <int HD>
__device__ __forceinline__ const bf16* kv_row(const bf16* base, const PagedKv& kv, const int32_t* table, int j, int kh) {
  const int32_t block = table[j / kv.block_size];
  return base + ((static_cast<int64_t>(block) * kv.block_size + j % kv.block_size) * kv.n_kv_heads + kh) * HD;
}

// Blocks an SM keeps resident: three up to head_dim 128 (all of Llama-2-7B's 288 decode blocks in one
// wave on 132 SMs), where the registers allow it without spilling.
template <int HD>
constexpr int kAttMinBlocks = HD <= 128 ? 3 : 1;

template <int HD>
__global__ void __launch_bounds__(kWarps * 32, kAttMinBlocks<HD>) attention_kernel(const bf16* __restrict__ q, const int32_t* __restrict__ pos,
                                                                 const int32_t* __restrict__ row, const int32_t* __restrict__ tiles,
                                                                 int n_heads, int window, PagedKv kv, int n_splits, float scale,
                                                                 float* __restrict__ scratch, bf16* __restrict__ out) {
  constexpr int DPL = HD >= 32 ? HD / 32 : 1;  // output dims per lane
  __shared__ __align__(16) float qs[kMaxGroup][HD];
  __shared__ float p_sh[kWarps][kMaxGroup][32];
  __shared__ float m_sh[kWarps][kMaxGroup], l_sh[kWarps][kMaxGroup];
  __shared__ float acc_sh[kWarps][kMaxGroup][HD];
  // Launched programmatically (decode), the kernel before (the QKV projection) may still run: until
  // pdl_wait() only the step's inputs (positions, rows, tiles, block tables: written before that
  // kernel started) are read, and this split's K/V rows are fetched into L2. The next kernel (a GEMV
  // over resident weights) may start now.
  pdl_launch_dependents();

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
  {
    // L2 holds whatever the QKV kernel writes to these lines meanwhile (the newest key's row).
    constexpr int kLines = HD * 2 >= 128 ? HD * 2 / 128 : 1;  // 128-byte lines of a K or V row
    for (int i = threadIdx.x; i < 2 * kLines * max(0, k1 - k0); i += blockDim.x) {
      const int j = k0 + i / (2 * kLines), part = i % (2 * kLines);
      const bf16* r = kv_row<HD>(part < kLines ? kv.k : kv.v, kv, table, j, kh) + (part % kLines) * 64;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(r));
    }
  }
  pdl_wait();

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
    // Lane j's key row offset (K and V rows share it); the V pass takes every lane's by shuffle.
    int64_t off = 0;
    if (valid) off = (static_cast<int64_t>(table[j / kv.block_size]) * kv.block_size + j % kv.block_size) * kv.n_kv_heads * HD + kh * HD;
    if (valid) {
      // K in pieces of up to 64 dims held in registers (one 16-byte load per 8 dims, a piece's loads
      // all in flight), then one pass per query row that exists (g of them, a loop: no predicated
      // work for the absent rows, and no registers per row); each row's dot is summed in dimension
      // order, its running sum kept in p_sh (the lane's own entry) between pieces.
      constexpr int KC = HD >= 8 ? HD / 8 : 1, KP = KC < 8 ? KC : 8;
#pragma unroll
      for (int c0 = 0; c0 < KC; c0 += KP) {
        uint4 kr[KP];
#pragma unroll
        for (int c = 0; c < KP; ++c) kr[c] = *reinterpret_cast<const uint4*>(kv.k + off + 8 * (c0 + c));
#pragma unroll 1
        for (int gi = 0; gi < g; ++gi) {
          float sv = c0 == 0 ? 0.0f : p_sh[warp][gi][lane];
#pragma unroll
          for (int c = 0; c < KP; ++c) {
            const bf16* kb = reinterpret_cast<const bf16*>(&kr[c]);
            const float4 qa = *reinterpret_cast<const float4*>(&qs[gi][8 * (c0 + c)]);
            const float4 qb = *reinterpret_cast<const float4*>(&qs[gi][8 * (c0 + c) + 4]);
            sv += qa.x * __bfloat162float(kb[0]);
            sv += qa.y * __bfloat162float(kb[1]);
            sv += qa.z * __bfloat162float(kb[2]);
            sv += qa.w * __bfloat162float(kb[3]);
            sv += qb.x * __bfloat162float(kb[4]);
            sv += qb.y * __bfloat162float(kb[5]);
            sv += qb.z * __bfloat162float(kb[6]);
            sv += qb.w * __bfloat162float(kb[7]);
          }
          p_sh[warp][gi][lane] = sv;
        }
      }
    }
#pragma unroll
    for (int gi = 0; gi < kMaxGroup; ++gi) {
      if (gi >= g) break;
      const bool ok = valid && j >= lo[gi] && j <= hi[gi];  // this row's causal / window limits
      const float sv = ok ? p_sh[warp][gi][lane] * scale : -FLT_MAX;
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
    // The tile's V rows, VR at a time with all their loads issued before any is used (two trips to
    // L2 for 32 rows at head_dim <= 128): lane l holds dims l * DPL .. l * DPL + DPL - 1 of each
    // row, DPL bf16 in one load; the rows' offsets come from their K lanes (no block-table reads).
    using VVec = VecOf<DPL>;
    constexpr int VR = DPL >= 8 ? 8 : 16;
    const bool has_dims = lane * DPL < HD;
#pragma unroll
    for (int u0 = 0; u0 < 32; u0 += VR) {
      if (u0 >= n_valid) break;
      VVec vraw[VR];
#pragma unroll
      for (int u = 0; u < VR; ++u) {
        const int64_t o = __shfl_sync(0xffffffffu, off, u0 + u);
        if (u0 + u < n_valid && has_dims) vraw[u] = *reinterpret_cast<const VVec*>(kv.v + o + lane * DPL);
      }
#pragma unroll
      for (int u = 0; u < VR; ++u) {
        if (u0 + u >= n_valid) break;
        float vf[DPL];
        unpack_bf16<DPL>(vraw[u], has_dims, vf);
#pragma unroll
        for (int gi = 0; gi < kMaxGroup; ++gi) {
          if (gi >= g) break;
          const float pv = p_sh[warp][gi][u0 + u];
#pragma unroll
          for (int d = 0; d < DPL; ++d) acc[gi][d] += pv * vf[d];
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

// ---- Tensor-core prefill tiles ----

constexpr int kMmaWarps = 4;
constexpr int kMmaRows = 16 * kMmaWarps;  // query rows per tile
constexpr int kKeyTile = 32;              // keys per shared-memory stage
constexpr bool mma_head_dim(int64_t hd) { return hd == 32 || hd == 64 || hd == 128; }

__device__ __forceinline__ void mma_bf16_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 BF16 matrices from shared memory (lane i gives row i % 8 of matrix i / 8), transposed
// on the way when Trans.
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// 16 bytes global -> shared, asynchronously; zeros when !ok (nothing is read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool ok) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, 4);
  return r;
}

// Fragment layouts of m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4 gid + tig:
// A (16 x 16): a0 (row gid, cols 2 tig, +1), a1 (row gid + 8), a2 (row gid, cols 2 tig + 8, +9), a3;
// B (16 x 8): b0 (rows 2 tig, +1, col gid), b1 (rows 2 tig + 8, +9); C: c0 c1 (row gid, cols 2 tig,
// +1), c2 c3 (row gid + 8). S = Q K^T takes B from K rows (ldmatrix), O += P V takes A from S's C
// registers (rounded to BF16) and B from V rows (ldmatrix .trans).
template <int HD>
__global__ void __launch_bounds__(kMmaWarps * 32) mma_attention_kernel(const bf16* __restrict__ q, const int32_t* __restrict__ pos,
                                                                        const int32_t* __restrict__ row, const int32_t* __restrict__ tiles,
                                                                        int n_heads, int window, PagedKv kv, int n_splits, float scale_log2,
                                                                        float* __restrict__ scratch, bf16* __restrict__ out) {
  static_assert(mma_head_dim(HD), "head_dim 32, 64 or 128");
  constexpr int LD = HD + 8;  // padded rows: the 8 rows an ldmatrix reads fall in distinct banks
  __shared__ __align__(16) bf16 ks[2][kKeyTile][LD];
  __shared__ __align__(16) bf16 vs[2][kKeyTile][LD];
  pdl_launch_dependents();

  const int kh = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
  const int group = n_heads / kv.n_kv_heads;
  const int t0 = tiles[2 * blockIdx.x], n_tok = tiles[2 * blockIdx.x + 1];
  const int g_rows = n_tok * group;
  // The tile's key range, and this thread's two rows (gid, gid + 8 of its warp) with their limits.
  int first = INT_MAX, last = -1;
  for (int i = 0; i < n_tok; ++i) {
    const int p = pos[t0 + i];
    last = max(last, p);
    first = min(first, window > 0 ? max(0, p - window + 1) : 0);
  }
  const int64_t q_dim = static_cast<int64_t>(n_heads) * HD;
  int lo[2], hi[2];
  const bf16* qr[2];
  int wlo = INT_MAX, whi = -1;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + gid + 8 * h;
    if (r < g_rows) {
      const int t = t0 + r / group;
      hi[h] = pos[t];
      lo[h] = window > 0 ? max(0, hi[h] - window + 1) : 0;
      qr[h] = q + t * q_dim + (kh * group + r % group) * HD;
      wlo = min(wlo, lo[h]);
      whi = max(whi, hi[h]);
    } else {
      hi[h] = -1;
      lo[h] = INT_MAX;
      qr[h] = nullptr;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    wlo = min(wlo, __shfl_xor_sync(0xffffffffu, wlo, o));
    whi = max(whi, __shfl_xor_sync(0xffffffffu, whi, o));
  }
  uint32_t qa[HD / 16][4];
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    const int c = kk * 16 + 2 * tig;
    qa[kk][0] = qr[0] ? *reinterpret_cast<const uint32_t*>(qr[0] + c) : 0u;
    qa[kk][1] = qr[1] ? *reinterpret_cast<const uint32_t*>(qr[1] + c) : 0u;
    qa[kk][2] = qr[0] ? *reinterpret_cast<const uint32_t*>(qr[0] + c + 8) : 0u;
    qa[kk][3] = qr[1] ? *reinterpret_cast<const uint32_t*>(qr[1] + c + 8) : 0u;
  }
  float o[HD / 8][4];
#pragma unroll
  for (int d = 0; d < HD / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

  const int32_t* table = kv.block_tables + static_cast<int64_t>(row[t0]) * kv.max_blocks;
  const int bs = kv.block_size, n_kv = kv.n_kv_heads;
  auto load = [&](int stage, int k0) {
    constexpr int CH = HD / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < kKeyTile * CH; i += kMmaWarps * 32) {
      const int kr = i / CH, c = i % CH, j = k0 + kr;
      const bool ok = j <= last;
      const int64_t off = ok ? ((static_cast<int64_t>(table[j / bs]) * bs + j % bs) * n_kv + kh) * HD + c * 8 : 0;
      cp_async_16(&ks[stage][kr][c * 8], kv.k + off, ok);
      cp_async_16(&vs[stage][kr][c * 8], kv.v + off, ok);
    }
    cp_async_commit();
  };
  const int n_kt = last >= first ? (last - first + kKeyTile) / kKeyTile : 0;
  if (n_kt > 0) load(0, first);
  for (int it = 0; it < n_kt; ++it) {
    const int k0 = first + it * kKeyTile, st = it & 1;
    if (it + 1 < n_kt) {
      load(st ^ 1, k0 + kKeyTile);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (whi >= k0 && wlo < k0 + kKeyTile) {  // some row of this warp sees a key of the tile
      float s[kKeyTile / 8][4];
#pragma unroll
      for (int nt = 0; nt < kKeyTile / 8; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int k2 = 0; k2 < HD / 32; ++k2) {
          uint32_t b[4];
          ldmatrix_x4<false>(b, &ks[st][nt * 8 + (lane & 7)][k2 * 32 + (lane >> 3) * 8]);
          mma_bf16_16816(s[nt], qa[2 * k2], b[0], b[1]);
          mma_bf16_16816(s[nt], qa[2 * k2 + 1], b[2], b[3]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kKeyTile / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = k0 + nt * 8 + 2 * tig + e;
            const float v = (j >= lo[h] && j <= hi[h]) ? s[nt][2 * h + e] * scale_log2 : -INFINITY;
            s[nt][2 * h + e] = v;
            mx = fmaxf(mx, v);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m[h], mx);
        const float mu = mn == -INFINITY ? 0.0f : mn;  // a row with no key yet: everything stays 0
        const float corr = exp2f(m[h] - mu);
        m[h] = mn;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kKeyTile / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = exp2f(s[nt][2 * h + e] - mu);
            s[nt][2 * h + e] = p;
            sum += p;
          }
        l[h] = l[h] * corr + sum;
#pragma unroll
        for (int d = 0; d < HD / 8; ++d) {
          o[d][2 * h] *= corr;
          o[d][2 * h + 1] *= corr;
        }
      }
#pragma unroll
      for (int kc = 0; kc < kKeyTile / 16; ++kc) {
        const uint32_t pa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                                pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
        for (int d2 = 0; d2 < HD / 16; ++d2) {
          uint32_t b[4];
          ldmatrix_x4<true>(b, &vs[st][kc * 16 + (lane & 15)][d2 * 16 + (lane >> 4) * 8]);
          mma_bf16_16816(o[2 * d2], pa, b[0], b[1]);
          mma_bf16_16816(o[2 * d2 + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the stage is refilled next
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    const int r = warp * 16 + gid + 8 * h;
    if (r >= g_rows) continue;
    const int t = t0 + r / group, head = kh * group + r % group;
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    if (n_splits == 1) {
      bf16* dst = out + t * q_dim + head * HD + 2 * tig;
#pragma unroll
      for (int d = 0; d < HD / 8; ++d)
        *reinterpret_cast<__nv_bfloat162*>(dst + d * 8) = __floats2bfloat162_rn(o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
    } else {
      // The combine kernel merges every token's splits: this row's result is split 0 (max 0, sum 1),
      // the other splits are empty.
      float* part = scratch + (static_cast<int64_t>(t) * n_heads + head) * n_splits * (HD + 2);
#pragma unroll
      for (int d = 0; d < HD / 8; ++d) {
        part[2 + d * 8 + 2 * tig] = o[d][2 * h] * inv;
        part[2 + d * 8 + 2 * tig + 1] = o[d][2 * h + 1] * inv;
      }
      if (tig == 0) {
        part[0] = 0.0f;
        part[1] = 1.0f;
        for (int sp = 1; sp < n_splits; ++sp) part[sp * (HD + 2) + 1] = 0.0f;
      }
    }
  }
}

// Grid (token * head), block head_dim threads: merges the splits' partial softmax results.
__global__ void combine_kernel(const float* __restrict__ scratch, int n_splits, int hd, bf16* __restrict__ out) {
  pdl_launch_dependents();
  pdl_wait();
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
void launch(const bf16* q, const int32_t* pos, const int32_t* row, const QueryTiles& tiles, int64_t n, int64_t n_heads, int64_t window,
            const PagedKv& kv, int n_splits, float* scratch, bf16* out, cudaStream_t s) {
  const float scale = 1.0f / sqrtf(static_cast<float>(HD));
  const int64_t n_mma = tiles.d ? tiles.n_mma : 0;
  if constexpr (mma_head_dim(HD)) {
    if (n_mma > 0) {
      dim3 grid(static_cast<unsigned>(n_mma), static_cast<unsigned>(kv.n_kv_heads));
      mma_attention_kernel<HD><<<grid, kMmaWarps * 32, 0, s>>>(q, pos, row, tiles.d, static_cast<int>(n_heads), static_cast<int>(window), kv,
                                                                n_splits, scale * 1.4426950408889634f, scratch, out);
      CUDA_CHECK_LAUNCH();
    }
  } else if (n_mma > 0) {
    throw CudaError("attention: tensor-core tiles for head_dim " + std::to_string(HD));
  }
  const int64_t n_small = tiles.d ? tiles.n - n_mma : n;
  // Decode (no tensor-core tiles): launched programmatically, so each kernel's launch, block start-up
  // and (attention) the K/V rows' trip to L2 overlap the tail of the kernel before it: +4% on
  // Llama-2-7B, +3% on Llama-3-8B at batch 1 on the H200 (notes/h200.md).
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.stream = s;
  cfg.attrs = &attr;
  cfg.numAttrs = n_mma == 0 && programmatic_launch() ? 1 : 0;
  if (n_small > 0) {
    cfg.gridDim = dim3(static_cast<unsigned>(n_small), static_cast<unsigned>(kv.n_kv_heads), static_cast<unsigned>(n_splits));
    cfg.blockDim = dim3(kWarps * 32);
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, attention_kernel<HD>, q, pos, row, tiles.d ? tiles.d + 2 * n_mma : static_cast<const int32_t*>(nullptr),
                                  static_cast<int>(n_heads), static_cast<int>(window), kv, n_splits, scale, scratch, out));
  }
  if (n_splits > 1) {
    cfg.gridDim = dim3(static_cast<unsigned>(n * n_heads));
    cfg.blockDim = dim3(HD);
    CUDA_CHECK(cudaLaunchKernelEx(&cfg, combine_kernel, static_cast<const float*>(scratch), n_splits, static_cast<int>(HD), out));
  }
}

}  // namespace

bool attention_supports(int64_t head_dim, int64_t group) {
  const bool hd_ok = head_dim == 8 || head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  return hd_ok && group >= 1 && group <= kMaxGroup;
}

int query_tile_tokens(int64_t n_heads, int64_t n_kv_heads) { return static_cast<int>(std::max<int64_t>(1, kMaxGroup / (n_heads / n_kv_heads))); }

bool tensor_core_attention() {
  static const bool on = [] {
    const char* e = std::getenv("FERRY_GPU_ATTN_MMA");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return on;
}

QueryTiles build_query_tiles(const int32_t* seq, int64_t n, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool tensor_cores,
                             int32_t* tiles_h) {
  const int64_t group = n_heads / n_kv_heads;
  const bool mma = tensor_cores && mma_head_dim(head_dim) && group <= kMmaRows;
  const int64_t mma_tok = kMmaRows / group, small_tok = query_tile_tokens(n_heads, n_kv_heads);
  QueryTiles qt;
  // Pass 0: runs of at least 16 query rows (one warp's MMA rows) in tensor-core tiles; pass 1: the rest.
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t t = 0; t < n;) {
      int64_t e = t + 1;
      while (e < n && seq[e] == seq[t]) ++e;
      const bool big = mma && (e - t) * group >= 16;
      if (big == (pass == 0)) {
        const int64_t step = big ? mma_tok : small_tok;
        for (int64_t u = t; u < e; u += step) {
          tiles_h[2 * qt.n] = static_cast<int32_t>(u);
          tiles_h[2 * qt.n + 1] = static_cast<int32_t>(std::min(step, e - u));
          ++qt.n;
        }
      }
      t = e;
    }
    if (pass == 0) qt.n_mma = qt.n;
  }
  return qt;
}

void attention(const bf16* q, const int32_t* pos, const int32_t* row, const QueryTiles& tiles, int64_t n, int64_t n_heads, int64_t window,
               const PagedKv& kv, int n_splits, float* scratch, bf16* out, cudaStream_t s) {
  if (n == 0) return;
#define FERRY_ATT(HD) launch<HD>(q, pos, row, tiles, n, n_heads, window, kv, n_splits, scratch, out, s)
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
