#include "cpu/cpu_executor.h"

#include <cstring>

#include "cpu/gemm.h"
#include "cpu/ops.h"
#include "offload/kv_cache.h"

namespace ferry::cpu {

CpuExecutor::CpuExecutor(const ModelConfig& cfg) : cfg_(cfg), inv_freq_(rope_inv_freq(cfg)) {}

Status CpuExecutor::begin_step(const StepBatch& b, const KvCache& kv) {
  bool any = false;
  for (int64_t il = 0; il < cfg_.n_layers; ++il) any |= kv.has_host_storage(il);
  if (!any) return invalid_argument("cpu executor: the KV cache has no host storage");
  const int64_t T = b.n_tokens();
  if (T == 0) return invalid_argument("empty step: no tokens");
  for (int64_t t = 0; t < T; ++t) {
    if (b.tokens[t] < 0 || b.tokens[t] >= cfg_.n_vocab)
      return invalid_argument(strprintf("token id %d at index %lld is outside the vocabulary [0, %lld)", b.tokens[t],
                                        static_cast<long long>(t), static_cast<long long>(cfg_.n_vocab)));
  }
  batch_ = &b;
  n_tokens_ = T;
  const size_t n = static_cast<size_t>(T);
  if (!external_x_) x_.resize(n * cfg_.n_embd);
  xn_.resize(n * cfg_.n_embd);
  q_.resize(n * cfg_.q_dim());
  k_.resize(n * cfg_.kv_dim());
  v_.resize(n * cfg_.kv_dim());
  att_.resize(n * cfg_.q_dim());
  gate_.resize(n * cfg_.n_ff);
  up_.resize(n * cfg_.n_ff);
  return Status::Ok();
}

void CpuExecutor::embed(const GlobalWeights& w) { embedding(w[kTokEmbd], batch_->tokens.data(), n_tokens_, x()); }

void CpuExecutor::add_lora(int64_t il, LayerTensor t, const float* x, float* y) {
  if (!lora_) return;
  const LoraPair& p = lora_->layers[il][t];
  if (p.empty()) return;
  const int64_t T = n_tokens_, r = lora_->cfg.rank;
  lora_u_.resize(static_cast<size_t>(T * r));
  sgemm(false, true, T, r, p.in, 1.0f, x, p.in, p.a.data(), p.in, 0.0f, lora_u_.data(), r);
  sgemm(false, true, T, p.out, r, lora_->cfg.scale(), lora_u_.data(), r, p.b.data(), r, 1.0f, y, p.out);
}

void CpuExecutor::layer(int64_t il, const LayerWeights& w, KvCache& kv) {
  const StepBatch& b = *batch_;
  const int64_t T = n_tokens_, E = cfg_.n_embd, hd = cfg_.head_dim;
  // Attention block.
  rmsnorm(x(), w[kAttnNorm], cfg_.rms_norm_eps, T, E, xn_.data());
  const int64_t Q = cfg_.q_dim(), KV = cfg_.kv_dim(), F = cfg_.n_ff;
  // The QKV at decode rows stays exact (FP32 code values and activations), as the GPU's QKV GEMV
  // keeps its FP32 code values and hi + lo activations: the attention scores feel its rounding most.
  const GemmPrecision qkv_prec = T <= kGemvMaxRows ? GemmPrecision::kExact : precision_;
  if (is_fused_qkv(w)) {  // one quantised qkv weight (architecture.h): one product, split
    // A quantised layer is one block in the layer layout, so bq, bk and bv are adjacent too.
    TensorView bias;
    if (!w[kBq].empty()) {
      FERRY_CHECK(w[kBk].data == static_cast<const uint8_t*>(w[kBq].data) + w[kBq].nbytes() &&
                  w[kBv].data == static_cast<const uint8_t*>(w[kBk].data) + w[kBk].nbytes());
      bias = TensorView::contiguous(w[kBq].data, w[kBq].dtype, {Q + 2 * KV});
    }
    fused_.resize(static_cast<size_t>(T * (Q + 2 * KV)));
    gemm_xwt(xn_.data(), T, w[kWqkv], fused_.data(), bias, qkv_prec);
    take_cols(fused_.data(), T, Q + 2 * KV, 0, Q, q_.data());
    take_cols(fused_.data(), T, Q + 2 * KV, Q, KV, k_.data());
    take_cols(fused_.data(), T, Q + 2 * KV, Q + KV, KV, v_.data());
  } else {
    gemm_xwt(xn_.data(), T, w[kWq], q_.data(), w[kBq], qkv_prec);
    gemm_xwt(xn_.data(), T, w[kWk], k_.data(), w[kBk], qkv_prec);
    gemm_xwt(xn_.data(), T, w[kWv], v_.data(), w[kBv], qkv_prec);
  }
  add_lora(il, kWq, xn_.data(), q_.data());
  add_lora(il, kWk, xn_.data(), k_.data());
  add_lora(il, kWv, xn_.data(), v_.data());
  rope(q_.data(), T, cfg_.n_heads, hd, b.positions.data(), inv_freq_.data());
  rope(k_.data(), T, cfg_.n_kv_heads, hd, b.positions.data(), inv_freq_.data());
  for (int64_t t = 0; t < T; ++t) kv.append(il, b.seq_ids[t], b.positions[t], k_.data() + t * cfg_.kv_dim(), v_.data() + t * cfg_.kv_dim());
  attention(q_.data(), T, b.positions.data(), b.seq_ids.data(), cfg_.n_heads, cfg_.sliding_window, il, kv, att_.data());
  gemm_xwt(att_.data(), T, w[kWo], xn_.data(), {}, precision_);
  add_lora(il, kWo, att_.data(), xn_.data());
  add_inplace(x(), xn_.data(), T * E);
  // MLP block.
  rmsnorm(x(), w[kFfnNorm], cfg_.rms_norm_eps, T, E, xn_.data());
  if (is_fused_gate_up(w)) {
    fused_.resize(static_cast<size_t>(T * 2 * F));
    gemm_xwt(xn_.data(), T, w[kWGateUp], fused_.data(), {}, precision_);
    take_cols(fused_.data(), T, 2 * F, 0, F, gate_.data());
    take_cols(fused_.data(), T, 2 * F, F, F, up_.data());
  } else {
    gemm_xwt(xn_.data(), T, w[kWGate], gate_.data(), {}, precision_);
    gemm_xwt(xn_.data(), T, w[kWUp], up_.data(), {}, precision_);
  }
  add_lora(il, kWGate, xn_.data(), gate_.data());
  add_lora(il, kWUp, xn_.data(), up_.data());
  swiglu(gate_.data(), up_.data(), T * cfg_.n_ff, gate_.data());
  gemm_xwt(gate_.data(), T, w[kWDown], xn_.data(), {}, precision_);
  add_lora(il, kWDown, gate_.data(), xn_.data());
  add_inplace(x(), xn_.data(), T * E);
}

void CpuExecutor::head(const GlobalWeights& w, float* logits) {
  const StepBatch& b = *batch_;
  const int64_t E = cfg_.n_embd, n_out = b.n_outputs();
  if (n_out == 0) return;
  for (int64_t i = 0; i < n_out; ++i)
    std::memcpy(xn_.data() + i * E, x() + b.output_rows[i] * E, E * sizeof(float));
  rmsnorm(xn_.data(), w[kOutNorm], cfg_.rms_norm_eps, n_out, E, xn_.data());
  gemm_xwt(xn_.data(), n_out, w[kLmHead], logits);
}

}  // namespace ferry::cpu
