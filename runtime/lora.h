// LoRA adapters as peft makes them: for each targeted Linear W [out, in] of a decoder layer,
// y = x W^T + scale * (x A^T) B^T with A [rank, in], B [out, rank] in float32 and scale = alpha /
// rank; the base weights stay frozen (BF16 or quantised, models/weight_format.h). This file holds
// the adapter's data, peft's initialisation, AdamW as torch.optim.AdamW computes it, and peft's
// files (adapter_model.safetensors + adapter_config.json). The gradients: cpu/lora_train.h.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "models/architecture.h"
#include "runtime/status.h"

namespace ferry {

// The Linears LoRA can target, in peft's order of a Llama layer.
inline constexpr LayerTensor kLoraTargets[] = {kWq, kWk, kWv, kWo, kWGate, kWUp, kWDown};
// peft's module name of a Linear ("q_proj", ..., "down_proj"); null for other tensors.
const char* lora_module_name(LayerTensor t);
// "self_attn.q_proj" or "mlp.down_proj".
std::string lora_module_suffix(LayerTensor t);
// Parses a comma-separated target list of module names ("q_proj,v_proj"), short names ("q,v") or
// "all" (the seven); refuses unknown names, naming them.
Expected<std::vector<LayerTensor>> parse_lora_targets(const std::string& list);

struct LoraConfig {
  int64_t rank = 8;
  double alpha = 16;
  std::vector<LayerTensor> targets;  // in kLoraTargets order
  float scale() const { return static_cast<float>(alpha / static_cast<double>(rank)); }
  bool targets_has(LayerTensor t) const;
};

// One Linear's adapter.
struct LoraPair {
  int64_t in = 0, out = 0;
  std::vector<float> a;  // [rank, in]
  std::vector<float> b;  // [out, rank]
  bool empty() const { return a.empty(); }
};

struct LoraAdapter {
  LoraConfig cfg;
  std::vector<std::array<LoraPair, kLayerTensorCount>> layers;  // [n_layers][LayerTensor]; empty pairs where not targeted

  // Every targeted Linear of `model`, A and B zero.
  static LoraAdapter zeros(const ModelConfig& model, const LoraConfig& cfg);
  // peft's default initialisation: A from kaiming_uniform(a = sqrt(5)), i.e. uniform in
  // [-1/sqrt(in), 1/sqrt(in)] (drawn from `seed`, not torch's generator), B zero.
  static LoraAdapter init(const ModelConfig& model, const LoraConfig& cfg, uint64_t seed);
  int64_t n_params() const;
  // peft's saved tensor name of layer il's pair ("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight").
  static std::string tensor_name(int64_t il, LayerTensor t, bool a);
};

// sqrt(sum of squares) over every A and B of `g` (torch.nn.utils.clip_grad_norm_'s total norm).
double lora_norm(const LoraAdapter& g);
// g *= s.
void lora_scale(LoraAdapter& g, float s);
// y += a * x (same shapes).
void lora_axpy(LoraAdapter& y, float a, const LoraAdapter& x);

// torch.optim.AdamW's hyper-parameters and its update (the single-tensor form: decoupled weight
// decay, then the moments, bias corrections, and p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)).
struct AdamWParams {
  double lr = 1e-4, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};
class AdamW {
 public:
  AdamW(const LoraAdapter& shape, const AdamWParams& p);
  // One step of every parameter of `w` with gradient `g` (same shapes).
  void step(LoraAdapter& w, const LoraAdapter& g);
  int64_t steps() const { return t_; }
  void set_lr(double lr) { p_.lr = lr; }
  // The optimizer's state (step count, both moments of every parameter) as one safetensors file
  // ("exp_avg.<tensor name>", "exp_avg_sq.<tensor name>"), written atomically with `metadata` and
  // "adamw_step"; load() reads one back for the same adapter shapes, refusing (naming the file and
  // tensor) any other, and returns its metadata.
  Status save(const std::string& path, std::map<std::string, std::string> metadata) const;
  Expected<std::map<std::string, std::string>> load(const std::string& path);

 private:
  AdamWParams p_;
  int64_t t_ = 0;
  LoraAdapter m_, v_;
};

// Writes `dir`/adapter_model.safetensors (F32 tensors, peft's names) and `dir`/adapter_config.json
// (peft_type LORA, r, lora_alpha, target_modules, ...), each atomically; creates `dir`.
// `base_model` goes into base_model_name_or_path.
// `metadata` goes into the safetensors header (ferry's training step, say).
Status save_lora(const LoraAdapter& w, const std::string& dir, const std::string& base_model,
                 const std::map<std::string, std::string>& metadata = {});
// Reads an adapter peft saved (or save_lora wrote) for `model`: its config and every tensor, shapes
// checked (F32, F16 or BF16). Refused, naming the file and key: another peft_type, dropout-free
// features ferry does not compute (use_dora, use_rslora, bias other than "none", fan_in_fan_out),
// a target outside the seven Linears, missing or extra tensors.
Expected<LoraAdapter> load_lora(const ModelConfig& model, const std::string& dir);

}  // namespace ferry
