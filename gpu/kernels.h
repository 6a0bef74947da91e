// Launchers of ferry's CUDA kernels, one .cu per op. Every launcher checks its launch. Layouts are
// row-major; `bf16` is __nv_bfloat16. The GPU executor calls these; tests/test_gpu.cpp checks each
// against the CPU op and a scalar reference.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "gpu/common.cuh"
#include "runtime/tensor.h"

namespace ferry::gpu {

// gemm.cu: y[M, N] = x[M, K] W[N, K]^T through cuBLAS: BF16 operands, FP32 accumulation, BF16 or FP32
// output. The handle's stream and workspace are the caller's.
void gemm(cublasHandle_t h, const bf16* x, const bf16* w, void* y, int64_t M, int64_t N, int64_t K, bool y_f32);
// gemv.cu: the same product with FP32 output for M <= kGemvMaxRows, streaming W once with 16-byte
// loads (decode: the weight bytes are the cost). gemm_f32() picks it for M <= kGemvPreferRows, where
// it beats cuBLAS on the H100 (notes/gpu.md), and cuBLAS above.
inline constexpr int64_t kGemvMaxRows = 8;
inline constexpr int64_t kGemvPreferRows = 2;
// `weights_fixed`: W is written by nobody while the GEMV may run (resident weights, not a ring slot
// behind an event): the GEMV is then launched with programmatic stream serialization and starts
// streaming W while the kernel before it finishes (sm_90+, unless FERRY_GPU_PDL=0).
// `x_lo` (optional, [M, K]): the lo BF16 parts of x (add_rmsnorm's out_lo); each row's x is then
// hi + lo, summed in float before the product: the precision of the hi + lo split at M rows, not 2M.
void gemv(const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s, bool weights_fixed = false,
          const bf16* x_lo = nullptr);
// Whether kernels are launched with programmatic stream serialization: an sm_90+ device and
// FERRY_GPU_PDL not 0.
bool programmatic_launch();
void gemm_f32(cublasHandle_t h, const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s,
              bool weights_fixed = false);

#define CUBLAS_CHECK(x)                                                                                         \
  do {                                                                                                          \
    cublasStatus_t s_ = (x);                                                                                    \
    if (s_ != CUBLAS_STATUS_SUCCESS)                                                                            \
      throw ::ferry::gpu::CudaError(std::string("cuBLAS error at ") + __FILE__ + ":" + std::to_string(__LINE__) + \
                                    ": " + #x + ": " + cublasGetStatusString(s_));                              \
  } while (0)

// embedding.cu: x[t, :] = float(table[ids[t], :]); table [n_vocab, n_embd] bf16, x [n, n_embd] f32.
void embedding(const bf16* table, const int32_t* ids, int64_t n, int64_t n_embd, float* x, cudaStream_t s);

// rmsnorm.cu: for each row r: (if delta) x[src] += delta[src]; y = rmsnorm(x[src]) * w; out[r] = bf16(y)
// and, when out_lo is given, out_lo[r] = bf16(y - out[r]) (hi + lo carries ~16 mantissa bits into a
// BF16 GEMM run on both). src = rows ? rows[r] : r. x and delta f32 [n_tokens, n_embd], w bf16.
// With `f16`, out and out_lo hold FP16 bits instead (hi + lo carries ~22 bits; |y| saturates at 65504).
void add_rmsnorm(float* x, const float* delta, const bf16* w, const int32_t* rows, int64_t n_rows, int64_t n_embd,
                 float eps, bf16* out, cudaStream_t s, bf16* out_lo = nullptr, bool f16 = false);
// x[i] += delta[i], f32 (the residual handed to a CPU-computed layer).
void add_f32(float* x, const float* delta, int64_t n, cudaStream_t s);

// Paged KV-cache geometry, the same as offload/kv_cache.h: per layer [n_blocks, block_size, n_kv, head_dim].
struct PagedKv {
  bf16* k = nullptr;
  bf16* v = nullptr;
  const int32_t* block_tables = nullptr;  // [n_rows, max_blocks] block ids per batch row
  int32_t max_blocks = 0;
  int32_t block_size = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
};

// rope_kv.cu: qkv f32 [n, q_dim + 2 kv_dim] (+ qkv_lo, the lo half's product, when not null; + bias
// [q_dim + 2 kv_dim]) -> q bf16 [n, n_heads, head_dim] rotated (rotate-half form, angle pos * inv_freq),
// and K (rotated) / V appended to the paged cache at (row[t], pos[t]). With kv.k null (K/V kept in
// host memory) q is [n, q_dim + 2 kv_dim] and receives q, k (both rotated) and v side by side.
void rope_kv_append(const float* qkv, const float* qkv_lo, const bf16* bias, const int32_t* pos, const int32_t* row, const float* inv_freq,
                    int64_t n, int64_t n_heads, const PagedKv& kv, bf16* q, cudaStream_t s);

// The decode layer's fused GEMVs (gemv.cu), for M <= kGemvFusedMaxRows rows: each removes a kernel
// and its round trip through memory from the layer. Their input is one of
//  - x [M, K] BF16 (with x_lo, hi + lo summed in float, as gemv());
//  - the residual stream normalised on the fly (`res` set): the input row m is RMSNorm(res[m]) * g,
//    computed as (W (res[m] * g)) * rsqrt(mean square + eps) in float, the mean square summed from
//    `ss` [M, n_ss] (the partial sums of squares gemv_residual wrote with that residual): no
//    RMSNorm kernel, no BF16 rounding of the normed row. g must be 16-byte aligned.
inline constexpr int64_t kGemvFusedMaxRows = 2;
struct GemvIn {
  const bf16* x = nullptr;
  const bf16* x_lo = nullptr;
  const float* res = nullptr;
  const bf16* g = nullptr;
  const float* ss = nullptr;
  int64_t n_ss = 0;
  float eps = 0.0f;
  // x and x_lo hold FP16 bits, not BF16 (add_rmsnorm's f16 output): taken as hi + lo rows by the
  // tensor-core NF4 kernel with FP16 code values (nf4_f16_path), and refused by every other path.
  bool f16 = false;
};
// The weight of a decode GEMV: BF16 [N, K], or a quantised blob (models/weight_format.h: NF4 codes
// with an absmax per 64, Q8 codes with a scale per row), dequantised in registers as it streams.
// NF4 / NF4-DQ at decode (up to 4 columns of x, K a multiple of 256) go through the tensor cores
// (sm_80+; FERRY_GPU_NF4_MMA=0: the CUDA-core kernel): each code pair is one shared-memory lookup of
// two BF16 code values, rounded 2^-9 relative as bitsandbytes' dequantisation to BF16 rounds each
// weight. `precise` (the QKV's, whose rounding the attention scores feel most) keeps the CUDA-core
// kernel and its FP32 code values, unless the rows are FP16 hi + lo (GemvIn::f16): then the tensor
// cores with FP16 code values (2^-11).
struct GemvW {
  const void* p = nullptr;
  DType dt = DType::kBF16;
  bool precise = false;
  GemvW(const bf16* w) : p(w) {}  // NOLINT: a BF16 weight passes as itself
  GemvW(const void* w, DType t, bool precise_codes = false) : p(w), dt(t), precise(precise_codes) {}
};
// Whether NF4 / NF4-DQ GEMVs of M rows (hi + lo: twice as many columns) take the tensor-core kernel.
bool nf4_mma_path(DType w, int64_t M, bool hi_lo);
// The tensor-core kernel's code table at one column of x: -1 (default) by format and size, 0 the 32 KB
// table (three stages a warp), 1 the 64 KB one (two stages). For tests and timing.
void set_nf4_table(int mode);
// The tensor-core kernel's grid: -1 (default) two blocks an SM, each taking every grid-th group of
// row tiles; 0 a block a group; N > 0 at most N blocks (tests: many groups a block at small sizes).
// Set it before building an executor (gemv_ss_parts sizes the residual's partial sums by it).
void set_nf4_grid_cap(int64_t blocks);
// Whether the QKV GEMV of M rows over NF4 / NF4-DQ weights with K columns takes FP16 hi + lo rows
// (GemvIn::f16) on the tensor cores: its code values then FP16 (2^-11 relative), where the BF16 ones
// (2^-9) moved the golden NF4 logits past the GPU's bound (2.26e-2, run97). FERRY_GPU_QKV_F16=0 keeps
// the CUDA-core kernel with FP32 code values.
bool nf4_f16_path(DType w, int64_t M, int64_t K);
// y[M, N] = x W^T for M <= kGemvMaxRows (gemv() is this with BF16 W).
void gemv_store(const GemvIn& in, const GemvW& w, float* y, int64_t M, int64_t N, int64_t K, cudaStream_t s, bool weights_fixed = false);
// res[M, N] += x W^T, and ss [M, gemv_ss_parts(N, w.dt, M, K)] = partial sums of the squares of each
// row's new values (in a fixed order: deterministic): the next GemvIn's mean square without another pass.
void gemv_residual(const GemvIn& in, const GemvW& w, float* res, float* ss, int64_t M, int64_t N, int64_t K, cudaStream_t s,
                   bool weights_fixed = false);
int64_t gemv_ss_parts(int64_t N, DType w = DType::kBF16, int64_t M = 1, int64_t K = 0);  // K: NF4's kernel depends on it
// w [2F, K] (gate rows, then up rows): h[M, F] = bf16(silu(x w_gate^T) * (x w_up^T)).
void gemv_swiglu(const GemvIn& in, const GemvW& w, bf16* h, int64_t M, int64_t F, int64_t K, cudaStream_t s, bool weights_fixed = false);
// w [(n_heads + 2 n_kv) head_dim, K] (q, k, v heads): the products go through rope_kv_append's
// per-element work (bias, rotation, q out, K/V into the paged cache or side by side in q).
void gemv_rope_kv(const GemvIn& in, const GemvW& w, const bf16* bias, const int32_t* pos, const int32_t* row, const float* inv_freq,
                  int64_t n_heads, const PagedKv& kv, bf16* q, int64_t M, int64_t K, cudaStream_t s, bool weights_fixed = false);

// quant.cu: rows [r0, r1) of a [rows, cols] weight, given as BF16 x [(r1 - r0), cols], quantised into
// the blob of `t` (NF4, NF4-DQ or Q8) bit for bit as models/weight_format.cpp does on the host; NF4-DQ
// leaves its fp32 absmax in `stage` (quant_stage_floats floats, device memory) and finish_quant
// double-quantises them into the blob once every row is written, part by part (`part_rows`, as
// models/weight_format.h's finish_quant; a no-op for the other formats).
void quantize_rows(DType t, const bf16* x, int64_t rows, int64_t cols, int64_t r0, int64_t r1, uint8_t* blob, cudaStream_t s, float* stage = nullptr);
void finish_quant(DType t, int64_t rows, int64_t cols, const float* stage, uint8_t* blob, cudaStream_t s, const std::vector<int64_t>& part_rows = {});
// Rows [r0, r1) of a quantised blob as BF16 y [(r1 - r0), cols] (for cuBLAS at many rows); with y_lo,
// also the BF16 rounding of what y leaves (y + y_lo carries ~16 bits of each weight).
void dequantize_rows(DType t, const uint8_t* blob, int64_t rows, int64_t cols, int64_t r0, int64_t r1, bf16* y, cudaStream_t s,
                     bf16* y_lo = nullptr);
// gemm() into columns of a wider output: y [M, ldy] f32, columns [0, N) written (accumulated into with `accumulate`).
void gemm_ld(cublasHandle_t h, const bf16* x, const bf16* w, float* y, int64_t M, int64_t N, int64_t K, int64_t ldy, bool accumulate = false);

// swiglu.cu: gate_up f32 [n, 2 n_ff] (gate then up) -> out bf16 [n, n_ff] = silu(gate) * up.
void swiglu(const float* gate_up, int64_t n, int64_t n_ff, bf16* out, cudaStream_t s);

// Query tiles of a step: `d` (device) holds n (first token, token count) pairs of consecutive tokens
// of one sequence; the first n_mma run on tensor cores (up to 64 query rows each), the rest on CUDA
// cores (up to query_tile_tokens() tokens each). d null: one token a tile (decode), CUDA cores.
struct QueryTiles {
  const int32_t* d = nullptr;
  int64_t n = 0, n_mma = 0;
};
// Writes the query tiles of tokens [0, n) into tiles_h (room for 2n ints; seq[t]: token t's
// sequence, a run of equal ids being consecutive positions): with `tensor_cores`, runs of at least
// 16 query rows as tensor-core tiles first (head_dim 32, 64 or 128), then the rest as CUDA-core
// tiles. Returns the counts with d null (the caller points it at the device copy).
QueryTiles build_query_tiles(const int32_t* seq, int64_t n, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, bool tensor_cores,
                             int32_t* tiles_h);
// Whether the executor uses tensor-core tiles: yes unless FERRY_GPU_ATTN_MMA=0 (for comparison).
bool tensor_core_attention();

// attention.cu: causal attention of q [n, n_heads, head_dim] over the paged cache; token t (batch row
// row[t], position pos[t]) sees positions [max(0, pos - window + 1), pos]. A tile's query rows share
// every K/V read. The CUDA-core tiles' work is split over the key range in `n_splits` parts (partials
// in `scratch`, n * n_heads * n_splits * (head_dim + 2) floats) and combined. Without tensor-core
// tiles (decode) both kernels are launched programmatically (programmatic_launch()).
void attention(const bf16* q, const int32_t* pos, const int32_t* row, const QueryTiles& tiles, int64_t n, int64_t n_heads,
               int64_t window, const PagedKv& kv, int n_splits, float* scratch, bf16* out, cudaStream_t s);
// Returns the most tokens a CUDA-core query tile may hold for this head layout (8 query rows per tile).
int query_tile_tokens(int64_t n_heads, int64_t n_kv_heads);
// Returns the head dims and GQA group sizes attention() supports (head_dim in {8..256} powers of 2, group <= 8).
bool attention_supports(int64_t head_dim, int64_t group);

// sampling.cu: out[r] = argmax(logits[r, :]) (lowest index on ties), logits f32 [n_rows, n_vocab];
// kNonFiniteToken for a row holding a NaN or an infinity (topk_sample likewise).
inline constexpr int32_t kNonFiniteToken = -1;
void argmax_rows(const float* logits, int64_t n_rows, int64_t n_vocab, int32_t* out, cudaStream_t s);

// sampling.cu: per row, keeps the top k logits (k <= kMaxTopK; descending, ties to the lower index),
// softmax at `temperature`, cuts to the smallest prefix with probability >= top_p, and draws with a
// counter-based hash of (seeds[row], step). out[row] = the token.
inline constexpr int kMaxTopK = 256;
void topk_sample(const float* logits, int64_t n_rows, int64_t n_vocab, int k, float temperature, float top_p, const uint64_t* seeds,
                 uint64_t step, int32_t* out, cudaStream_t s);

// convert.cu: dst bf16[n] from f32, f16 or bf16 source bits (dtype: 0 f32, 1 f16, 2 bf16).
void to_bf16(const void* src, int dtype, int64_t n, bf16* dst, cudaStream_t s);
// dst <- src by a kernel (16-byte words and a byte tail; cudaMemcpyAsync when a pointer is not
// 16-byte aligned): for pinned host memory read or written through its mapped address, which keeps
// small transfers off the copy engine. A cudaMemcpyAsync from host memory queues behind the streamed
// weights' copies whatever its stream: a step's inputs waited 7 ms for the next step's prefetch.
void copy_by_kernel(const void* src, void* dst, int64_t bytes, cudaStream_t s);
// Synthetic weights on the device: the same values as models/synthetic.cpp's synthetic_fill_bf16.
// `first`: the index of dst[0] in the tensor (a tensor generated a few rows at a time).
void synthetic_fill(uint64_t key, float scale, bool is_norm, int64_t n, bf16* dst, cudaStream_t s, int64_t first = 0);

}  // namespace ferry::gpu
