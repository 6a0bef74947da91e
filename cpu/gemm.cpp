#include "cpu/gemm.h"

#include <algorithm>
#include <string>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include "cpu/simd.h"

namespace ferry::cpu {

namespace {

// Converts `n` weights of `dtype` starting at `src` to float32.
void row_to_f32(const void* src, DType dtype, float* dst, int64_t n) {
  switch (dtype) {
    case DType::kF32: std::copy_n(static_cast<const float*>(src), n, dst); return;
    case DType::kBF16: bf16_to_f32_row(static_cast<const uint16_t*>(src), dst, n); return;
    case DType::kF16: f16_to_f32_row(static_cast<const uint16_t*>(src), dst, n); return;
    default: FERRY_CHECK_MSG(false, "gemm: weight dtype must be F32, F16 or BF16");
  }
}

struct OneDnn {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
};
OneDnn& onednn() {
  static OneDnn o;
  return o;
}

// y[M, nc] (row stride ldy) = x[M, K] * Wf[nc, K]^T, all float32, through oneDNN.
void onednn_f32(const float* x, int64_t M, int64_t K, const float* w, int64_t nc, float* y, int64_t ldy) {
  using dt = dnnl::memory::data_type;
  using md = dnnl::memory::desc;
  OneDnn& o = onednn();
  md a({M, K}, dt::f32, dnnl::memory::dims{K, 1});
  md b({K, nc}, dt::f32, dnnl::memory::dims{1, K});
  md c({M, nc}, dt::f32, dnnl::memory::dims{ldy, 1});
  // oneDNN keeps a primitive cache, so re-creating the same shape is a lookup.
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), o.engine);
  dnnl::matmul prim(pd);
  dnnl::memory am(a, o.engine, const_cast<float*>(x));
  dnnl::memory bm(b, o.engine, const_cast<float*>(w));
  dnnl::memory cm(c, o.engine, y);
  prim.execute(o.stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
  o.stream.wait();
}

// y[M, N] = bf16(x)[M, K] * W[N, K]^T with BF16 W in place, through oneDNN's BF16 matmul (AMX or
// AVX-512 BF16 where the CPU has them). Returns false when oneDNN has no such primitive here.
bool onednn_bf16(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y) {
  using dt = dnnl::memory::data_type;
  using md = dnnl::memory::desc;
  OneDnn& o = onednn();
  thread_local std::vector<uint16_t> xb;
  xb.resize(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) xb[i] = f32_to_bf16(x[i]);
  try {
    md a({M, K}, dt::bf16, dnnl::memory::dims{K, 1});
    md b({K, N}, dt::bf16, dnnl::memory::dims{1, K});
    md c({M, N}, dt::f32, dnnl::memory::dims{N, 1});
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), o.engine);
    if (std::string(pd.impl_info_str()).find("ref") != std::string::npos) return false;  // no fast kernel for this ISA
    dnnl::matmul prim(pd);
    dnnl::memory am(a, o.engine, xb.data());
    dnnl::memory bm(b, o.engine, const_cast<uint16_t*>(w));
    dnnl::memory cm(c, o.engine, y);
    prim.execute(o.stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    o.stream.wait();
  } catch (const dnnl::error&) {
    return false;
  }
  return true;
}

}  // namespace

void gemm_xwt_stream(const float* x, int64_t M, const TensorView& W, float* y) {
  const int64_t N = W.shape[0], K = W.shape[1];
  const size_t row_bytes = static_cast<size_t>(K) * dtype_size(W.dtype);
  const uint8_t* wbase = static_cast<const uint8_t*>(W.data);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, N, grain), [&](const tbb::blocked_range<int64_t>& r) {
    thread_local std::vector<float> row;
    if (static_cast<int64_t>(row.size()) < K) row.resize(K);
    for (int64_t n = r.begin(); n < r.end(); ++n) {
      const void* src = wbase + n * row_bytes;
      const float* wr;
      if (W.dtype == DType::kF32) {
        wr = static_cast<const float*>(src);
      } else {
        row_to_f32(src, W.dtype, row.data(), K);
        wr = row.data();
      }
      for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_f32(x + m * K, wr, K);
    }
  });
}

void gemm_xwt_onednn(const float* x, int64_t M, const TensorView& W, float* y) {
  const int64_t N = W.shape[0], K = W.shape[1];
  if (W.dtype == DType::kF32) {
    onednn_f32(x, M, K, static_cast<const float*>(W.data), N, y, N);
    return;
  }
  // Convert panels of W to float32 (about 4 MiB each) and multiply each panel.
  const int64_t panel = std::clamp<int64_t>(((int64_t{1} << 20) / std::max<int64_t>(K, 1)) / 16 * 16, 16, N);
  thread_local std::vector<float> wf;
  if (static_cast<int64_t>(wf.size()) < panel * K) wf.resize(panel * K);
  const size_t row_bytes = static_cast<size_t>(K) * dtype_size(W.dtype);
  const uint8_t* wbase = static_cast<const uint8_t*>(W.data);
  float* wfp = wf.data();
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t nc = std::min(panel, N - n0);
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, nc, 8), [&](const tbb::blocked_range<int64_t>& r) {
      for (int64_t n = r.begin(); n < r.end(); ++n) row_to_f32(wbase + (n0 + n) * row_bytes, W.dtype, wfp + n * K, K);
    });
    onednn_f32(x, M, K, wfp, nc, y + n0, N);
  }
}

void gemm_xwt(const float* x, int64_t M, const TensorView& W, float* y, const TensorView& bias, GemmPrecision prec) {
  FERRY_CHECK(W.n_dims == 2 && W.is_contiguous());
  if (M <= kGemvMaxRows) gemm_xwt_stream(x, M, W, y);
  else if (!(prec == GemmPrecision::kBf16Inputs && W.dtype == DType::kBF16 &&
             onednn_bf16(x, M, W.shape[1], static_cast<const uint16_t*>(W.data), W.shape[0], y)))
    gemm_xwt_onednn(x, M, W, y);
  if (!bias.empty()) {
    const int64_t N = W.shape[0];
    thread_local std::vector<float> b;
    b.resize(N);
    convert_to_f32(bias.data, bias.dtype, b.data(), N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += b[n];
  }
}

}  // namespace ferry::cpu
