#include "cpu/gemm.h"

#include <algorithm>
#include <string>
#include <vector>

#include <oneapi/dnnl/dnnl.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include "cpu/simd.h"
#include "models/weight_format.h"

namespace ferry::cpu {

namespace {

// Rows [n0, n1)'s NF4 absmax (K / 64 a row) of an NF4 or NF4-DQ weight: in the blob, or NF4-DQ's
// expanded into tmp ((n1 - n0) * K / 64 floats; a task's rows at once keep the gathers pipelined).
const float* rows_absmax(const TensorView& W, int64_t n0, int64_t n1, float* tmp) {
  const int64_t N = W.shape[0], K = W.shape[1];
  const uint8_t* base = static_cast<const uint8_t*>(W.data);
  const QuantLayout l = quant_layout(W.dtype, N, K);
  if (W.dtype == DType::kNF4) return reinterpret_cast<const float*>(base + l.scales) + n0 * (K / 64);
  nf4dq_absmax(base + l.scales, reinterpret_cast<const float*>(base + l.scales2), reinterpret_cast<const float*>(base + l.means), n0 * (K / 64),
               (n1 - n0) * (K / 64), tmp);
  return tmp;
}

}  // namespace

void row_to_f32(const TensorView& W, int64_t n, float* dst) {
  const int64_t N = W.shape[0], K = W.shape[1];
  const uint8_t* base = static_cast<const uint8_t*>(W.data);
  switch (W.dtype) {
    case DType::kF32: std::copy_n(reinterpret_cast<const float*>(base) + n * K, K, dst); return;
    case DType::kBF16: bf16_to_f32_row(reinterpret_cast<const uint16_t*>(base) + n * K, dst, K); return;
    case DType::kF16: f16_to_f32_row(reinterpret_cast<const uint16_t*>(base) + n * K, dst, K); return;
    case DType::kNF4:
    case DType::kNF4DQ: {
      thread_local std::vector<float> absmax;
      absmax.resize(static_cast<size_t>(K / 64));
      nf4_to_f32_row(base + n * K / 2, rows_absmax(W, n, n + 1, absmax.data()), dst, K);
      return;
    }
    case DType::kQ8: {
      const QuantLayout l = quant_layout(DType::kQ8, N, K);
      q8_to_f32_row(reinterpret_cast<const int8_t*>(base) + n * K, reinterpret_cast<const float*>(base + l.scales)[n], dst, K);
      return;
    }
    default: FERRY_CHECK_MSG(false, "gemm: weight dtype must be F32, F16, BF16, NF4, NF4DQ or Q8");
  }
}

namespace {

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

// y[M, N] (row stride ldy) = xb[M, K] * W[N, K]^T, xb and W BF16, through oneDNN's BF16 matmul (AMX or
// AVX-512 BF16 where the CPU has them). Returns false when oneDNN has no such primitive here.
bool onednn_bf16(const uint16_t* xb, int64_t M, int64_t K, const uint16_t* w, int64_t N, float* y, int64_t ldy) {
  using dt = dnnl::memory::data_type;
  using md = dnnl::memory::desc;
  OneDnn& o = onednn();
  try {
    md a({M, K}, dt::bf16, dnnl::memory::dims{K, 1});
    md b({K, N}, dt::bf16, dnnl::memory::dims{1, K});
    md c({M, N}, dt::f32, dnnl::memory::dims{ldy, 1});
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), o.engine);
    if (std::string(pd.impl_info_str()).find("ref") != std::string::npos) return false;  // no fast kernel for this ISA
    dnnl::matmul prim(pd);
    dnnl::memory am(a, o.engine, const_cast<uint16_t*>(xb));
    dnnl::memory bm(b, o.engine, const_cast<uint16_t*>(w));
    dnnl::memory cm(c, o.engine, y);
    prim.execute(o.stream, {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}});
    o.stream.wait();
  } catch (const dnnl::error&) {
    return false;
  }
  return true;
}

// Runs fn(n) for n in [0, count) on OpenMP's threads, oneDNN's: the panels converted for it
// alternate with its matmuls, and converted on TBB's threads they ran beside OpenMP's workers still
// spinning after the last matmul (2 cores: a 4096 x 11008 NF4 product at 16 rows took 10-24 ms,
// 8-9 with OMP_WAIT_POLICY=passive).
template <typename F>
void omp_rows(int64_t count, F&& fn) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < count; ++n) fn(n);
}

std::vector<uint16_t> to_bf16(const float* x, int64_t n) {
  std::vector<uint16_t> b(static_cast<size_t>(n));
  f32_to_bf16_row(x, b.data(), n);
  return b;
}

// A quantised W at many rows: panels of W dequantised to BF16 (about 8 MiB each) and multiplied by
// oneDNN's BF16 matmul into y's columns, as the GPU does with its tiles. Returns false where oneDNN
// has no fast BF16 kernel (the caller then computes all of y another way).
bool quant_bf16(const float* x, int64_t M, const TensorView& W, float* y) {
  const int64_t N = W.shape[0], K = W.shape[1];
  const std::vector<uint16_t> xb = to_bf16(x, M * K);
  const int64_t panel = std::clamp<int64_t>(((int64_t{4} << 20) / std::max<int64_t>(K, 1)) / 16 * 16, 16, N);
  // Reused (a fresh 8 MiB vector was page-faulted in every product); the workers write through wbp,
  // not the name, which would be their own thread's empty vector.
  thread_local std::vector<uint16_t> wb;
  wb.resize(static_cast<size_t>(panel * K));
  uint16_t* wbp = wb.data();
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t nc = std::min(panel, N - n0);
    omp_rows(nc, [&](int64_t n) {
      thread_local std::vector<float> row;
      row.resize(static_cast<size_t>(K));
      row_to_f32(W, n0 + n, row.data());
      f32_to_bf16_row(row.data(), wbp + n * K, K);
    });
    if (!onednn_bf16(xb.data(), M, K, wbp, nc, y + n0, N)) return false;
  }
  return true;
}

}  // namespace

void gemm_xwt_stream(const float* x, int64_t M, const TensorView& W, float* y, GemmPrecision prec) {
  const int64_t N = W.shape[0], K = W.shape[1];
  if (is_quantized(W.dtype) || (W.dtype == DType::kBF16 && M <= kGemvMaxRows)) {
    // Each weight row is decoded in registers and dotted with every x row (no float copy of it),
    // NF4 and BF16 against x split once here into the phases their decoded vectors hold; NF4 at BF16
    // inputs by the kernel nf4_decode_dot() names (int16 x and code values where the CPU has VNNI).
    FERRY_CHECK(M <= kGemvMaxRows);
    const uint8_t* base = static_cast<const uint8_t*>(W.data);
    const float* scales = W.dtype == DType::kQ8 ? reinterpret_cast<const float*>(base + quant_layout(W.dtype, N, K).scales) : nullptr;
    const Nf4Dot dot = is_nf4(W.dtype) && prec == GemmPrecision::kBf16Inputs ? nf4_decode_dot() : Nf4Dot::kF32;
    thread_local std::vector<float> split, xscales;
    thread_local std::vector<int16_t> split_w;
    const float* xs = x;
    if (dot == Nf4Dot::kI16) {
      split_w.resize(static_cast<size_t>(M * K));
      xscales.resize(static_cast<size_t>(M * ((K + 127) / 128)));
      split_for_rows_i16(x, M, K, split_w.data(), xscales.data());
    } else if (W.dtype != DType::kQ8) {
      split.resize(static_cast<size_t>(M * K));
      split_for_rows(W.dtype, x, M, K, split.data());
      xs = split.data();
    }
    const int16_t* xq = split_w.data();
    const float* xsc = xscales.data();
    // About 32 KiB of weights a task.
    const int64_t row_bytes = is_nf4(W.dtype) ? K / 2 : W.dtype == DType::kQ8 ? K : 2 * K;
    const int64_t qgrain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes));
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, N, qgrain), [&](const tbb::blocked_range<int64_t>& r) {
      float out[kGemvMaxRows];
      thread_local std::vector<float> absmax;  // NF4-DQ: the task's absmax, dequantised
      const float* a = nullptr;
      if (is_nf4(W.dtype)) {
        if (W.dtype == DType::kNF4DQ) absmax.resize(static_cast<size_t>((r.end() - r.begin()) * (K / 64)));
        a = rows_absmax(W, r.begin(), r.end(), absmax.data());
      }
      for (int64_t n = r.begin(); n < r.end(); ++n) {
        switch (W.dtype) {
          case DType::kNF4:
          case DType::kNF4DQ:
            if (dot == Nf4Dot::kI16) nf4_dot_rows_i16(base + n * K / 2, a + (n - r.begin()) * (K / 64), xq, xsc, K, K, M, out);
            else nf4_dot_rows(base + n * K / 2, a + (n - r.begin()) * (K / 64), xs, K, K, M, out);
            break;
          case DType::kQ8: q8_dot_rows(reinterpret_cast<const int8_t*>(base) + n * K, scales[n], xs, K, K, M, out); break;
          default: bf16_dot_rows(reinterpret_cast<const uint16_t*>(base) + n * K, xs, K, K, M, out); break;
        }
        for (int64_t m = 0; m < M; ++m) y[m * N + n] = out[m];
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  tbb::parallel_for(tbb::blocked_range<int64_t>(0, N, grain), [&](const tbb::blocked_range<int64_t>& r) {
    thread_local std::vector<float> row;
    if (static_cast<int64_t>(row.size()) < K) row.resize(K);
    for (int64_t n = r.begin(); n < r.end(); ++n) {
      const float* wr;
      if (W.dtype == DType::kF32) {
        wr = static_cast<const float*>(W.data) + n * K;
      } else {
        row_to_f32(W, n, row.data());
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
  float* wfp = wf.data();
  for (int64_t n0 = 0; n0 < N; n0 += panel) {
    const int64_t nc = std::min(panel, N - n0);
    omp_rows(nc, [&](int64_t n) { row_to_f32(W, n0 + n, wfp + n * K); });
    onednn_f32(x, M, K, wfp, nc, y + n0, N);
  }
}

void gemm_xwt(const float* x, int64_t M, const TensorView& W, float* y, const TensorView& bias, GemmPrecision prec) {
  FERRY_CHECK(W.n_dims == 2 && W.is_contiguous());
  const int64_t N = W.shape[0], K = W.shape[1];
  // Many rows at BF16 precision: oneDNN's BF16 matmul over W in place (BF16) or over BF16 panels of
  // it (quantised), where oneDNN has a fast kernel; else the float32 path.
  const bool bf16_path = prec == GemmPrecision::kBf16Inputs && (W.dtype == DType::kBF16 || is_quantized(W.dtype));
  if (M <= kGemvMaxRows) gemm_xwt_stream(x, M, W, y, prec);
  else if (!bf16_path || !(W.dtype == DType::kBF16 ? onednn_bf16(to_bf16(x, M * K).data(), M, K, static_cast<const uint16_t*>(W.data), N, y, N)
                                                     : quant_bf16(x, M, W, y)))
    gemm_xwt_onednn(x, M, W, y);
  if (!bias.empty()) {
    thread_local std::vector<float> b;
    b.resize(N);
    convert_to_f32(bias.data, bias.dtype, b.data(), N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += b[n];
  }
}

void sgemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B, int64_t ldb,
           float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  FERRY_CHECK_MSG(st == dnnl_success, "oneDNN sgemm failed");
}

}  // namespace ferry::cpu
