#include "gpu/kernels.h"

#include <cfloat>
#include <string>

namespace ferry::gpu {

namespace {
// Reduces (value, index) pairs over the warp: the largest value, ties to the lower index.
__device__ __forceinline__ void warp_argmax(float& best, int32_t& bi) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > best || (ov == best && oi < bi)) {
      best = ov;
      bi = oi;
    }
  }
}

// One block per row; ties go to the lowest index (as the CPU argmax).
// A row holding a NaN or an infinity gets -1 (kNonFiniteToken): the caller reports it.
__global__ void argmax_kernel(const float* __restrict__ logits, int64_t n_vocab, int32_t* __restrict__ out) {
  __shared__ float sv[32];
  __shared__ int32_t si[32];
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const float* row = logits + blockIdx.x * n_vocab;
  float best = -FLT_MAX;
  int32_t bi = INT32_MAX;
  bool nonfinite = false;
  for (int64_t i = threadIdx.x; i < n_vocab; i += blockDim.x) {
    const float v = row[i];
    nonfinite |= !isfinite(v);
    if (v > best) {
      best = v;
      bi = static_cast<int32_t>(i);
    }
  }
  if (nonfinite) bad = 1;
  warp_argmax(best, bi);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = best;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    best = lane < n_warps ? sv[lane] : -FLT_MAX;
    bi = lane < n_warps ? si[lane] : INT32_MAX;
    warp_argmax(best, bi);
    if (lane == 0) out[blockIdx.x] = bad ? kNonFiniteToken : bi;
  }
}
}  // namespace

void argmax_rows(const float* logits, int64_t n_rows, int64_t n_vocab, int32_t* out, cudaStream_t s) {
  if (n_rows == 0) return;
  argmax_kernel<<<static_cast<unsigned>(n_rows), 1024, 0, s>>>(logits, n_vocab, out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu

namespace ferry::gpu {

namespace {

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// One block per row: top-k by k rounds of a block-wide argmax over the not-yet-chosen logits (in
// descending order, ties to the lower index), then thread 0 applies temperature, top-p and draws.
__global__ void topk_sample_kernel(const float* __restrict__ logits, int64_t n_vocab, int k, float temperature, float top_p,
                                   const uint64_t* __restrict__ seeds, uint64_t step, int32_t* __restrict__ out) {
  __shared__ float cand_v[kMaxTopK];
  __shared__ int32_t cand_i[kMaxTopK];
  __shared__ float rv[32];
  __shared__ int32_t ri[32];
  __shared__ int bad;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  const float* row = logits + blockIdx.x * n_vocab;
  for (int64_t i = threadIdx.x; i < n_vocab; i += blockDim.x)
    if (!isfinite(row[i])) bad = 1;
  __syncthreads();
  if (bad) {
    if (threadIdx.x == 0) out[blockIdx.x] = kNonFiniteToken;
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  float last_v = FLT_MAX;
  int32_t last_i = -1;
  for (int r = 0; r < k; ++r) {
    float best = -FLT_MAX;
    int32_t bi = INT32_MAX;
    for (int64_t i = threadIdx.x; i < n_vocab; i += blockDim.x) {
      const float v = row[i];
      const bool after = v < last_v || (v == last_v && i > last_i);  // not chosen yet
      if (after && (v > best || (v == best && i < bi))) {
        best = v;
        bi = static_cast<int32_t>(i);
      }
    }
    warp_argmax(best, bi);
    if (lane == 0) {
      rv[warp] = best;
      ri[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < n_warps; ++w)
        if (rv[w] > rv[0] || (rv[w] == rv[0] && ri[w] < ri[0])) {
          rv[0] = rv[w];
          ri[0] = ri[w];
        }
      cand_v[r] = rv[0];
      cand_i[r] = ri[0];
    }
    __syncthreads();
    last_v = cand_v[r];
    last_i = cand_i[r];
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  const float mx = cand_v[0];
  double sum = 0;
  for (int r = 0; r < k; ++r) {
    cand_v[r] = __expf((cand_v[r] - mx) / temperature);
    sum += cand_v[r];
  }
  int keep = k;
  double cum = 0;
  for (int r = 0; r < k; ++r) {
    cum += cand_v[r] / sum;
    if (cum >= top_p) {
      keep = r + 1;
      break;
    }
  }
  double total = 0;
  for (int r = 0; r < keep; ++r) total += cand_v[r];
  const uint64_t h = mix64(seeds[blockIdx.x] ^ mix64(step + 0x5851f42d4c957f2dull));
  double u = static_cast<double>(h >> 11) * (1.0 / 9007199254740992.0) * total;
  int32_t pick = cand_i[keep - 1];
  for (int r = 0; r < keep; ++r) {
    u -= cand_v[r];
    if (u <= 0) {
      pick = cand_i[r];
      break;
    }
  }
  out[blockIdx.x] = pick;
}

}  // namespace

void topk_sample(const float* logits, int64_t n_rows, int64_t n_vocab, int k, float temperature, float top_p, const uint64_t* seeds,
                 uint64_t step, int32_t* out, cudaStream_t s) {
  if (n_rows == 0) return;
  if (k < 1 || k > kMaxTopK) throw CudaError("topk_sample: k must be in [1, " + std::to_string(kMaxTopK) + "]");
  topk_sample_kernel<<<static_cast<unsigned>(n_rows), 1024, 0, s>>>(logits, n_vocab, k, temperature, top_p, seeds, step, out);
  CUDA_CHECK_LAUNCH();
}

}  // namespace ferry::gpu
