// CpuExecutor: the whole model step on the CPU in float32 (weights converted from F32/F16/BF16 as
// they are read), the exact reference every other backend and placement is compared against.
#pragma once

#include <memory>
#include <vector>

#include "cpu/gemm.h"
#include "models/config.h"
#include "runtime/executor.h"
#include "runtime/lora.h"

namespace ferry::cpu {

class CpuExecutor final : public Executor {
 public:
  explicit CpuExecutor(const ModelConfig& cfg);

  std::string_view name() const override { return "cpu"; }
  Status begin_step(const StepBatch& batch, const KvCache& kv) override;
  void embed(const GlobalWeights& w) override;
  void layer(int64_t il, const LayerWeights& w, KvCache& kv) override;
  void head(const GlobalWeights& w, float* logits) override;
  // Keeps the residual stream [n_tokens, n_embd] in `x` (sized by the caller for the step) instead
  // of its own buffer: the GPU executor hands CPU-computed layers a pinned buffer.
  void use_hidden(float* x) { external_x_ = x; }
  // Multi-row GEMMs (prefill) with BF16 inputs on oneDNN's BF16 matmul (cpu/gemm.h): what the GPU
  // executor's CPU-computed layers use. The default is the exact float32 reference.
  void set_precision(GemmPrecision p) { precision_ = p; }
  // Adds a LoRA adapter's products to its Linears (unmerged, float32: y += scale (x A^T) B^T, as
  // peft computes them), e.g. one `ferry finetune` wrote (--lora). Null removes it.
  void set_lora(std::shared_ptr<const LoraAdapter> lora) { lora_ = std::move(lora); }

 private:
  float* x() { return external_x_ ? external_x_ : x_.data(); }
  // y[T, out] += the adapter's product for Linear `t` of layer il on x [T, in] (nothing without one).
  void add_lora(int64_t il, LayerTensor t, const float* x, float* y);
  float* external_x_ = nullptr;
  std::shared_ptr<const LoraAdapter> lora_;
  std::vector<float> lora_u_;  // [n_tokens, rank]
  GemmPrecision precision_ = GemmPrecision::kExact;
  ModelConfig cfg_;
  std::vector<float> inv_freq_;  // [head_dim / 2]
  const StepBatch* batch_ = nullptr;
  int64_t n_tokens_ = 0;
  // Workspace, float32, sized for the step.
  std::vector<float> x_;     // [n_tokens, n_embd] residual stream
  std::vector<float> xn_;    // [n_tokens, n_embd] normed input of a block
  std::vector<float> q_;     // [n_tokens, q_dim]
  std::vector<float> k_;     // [n_tokens, kv_dim]
  std::vector<float> v_;     // [n_tokens, kv_dim]
  std::vector<float> att_;   // [n_tokens, q_dim]
  std::vector<float> gate_;  // [n_tokens, n_ff]
  std::vector<float> up_;    // [n_tokens, n_ff]
  std::vector<float> fused_; // [n_tokens, q + 2 kv or 2 n_ff]: a fused weight's product (quantised layers)
};

}  // namespace ferry::cpu
