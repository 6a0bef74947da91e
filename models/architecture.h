// The per-layer recipe of the Llama family (Llama, Mistral, Qwen2): which tensors a layer has, their
// Hugging Face names and shapes, and the weight views executors compute with.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "models/config.h"
#include "runtime/tensor.h"

namespace ferry {

// The tensors of one decoder layer. Biases exist only where cfg.attention_bias.
enum LayerTensor : int {
  kAttnNorm,  // [n_embd]
  kWq,        // [q_dim, n_embd]
  kWk,        // [kv_dim, n_embd]
  kWv,        // [kv_dim, n_embd]
  kBq,        // [q_dim]
  kBk,        // [kv_dim]
  kBv,        // [kv_dim]
  kWo,        // [n_embd, q_dim]
  kFfnNorm,   // [n_embd]
  kWGate,     // [n_ff, n_embd]
  kWUp,       // [n_ff, n_embd]
  kWDown,     // [n_embd, n_ff]
  kLayerTensorCount
};

enum GlobalTensor : int {
  kTokEmbd,  // [n_vocab, n_embd]
  kOutNorm,  // [n_embd]
  kLmHead,   // [n_vocab, n_embd]; the embedding when tied
  kGlobalTensorCount
};

struct TensorSpec {
  std::string name;             // Hugging Face name; empty when the model has no such tensor
  std::vector<int64_t> shape;
};

// Returns the specs of layer `il`, indexed by LayerTensor. `fused`: q/k/v and gate/up as the fused
// weights of a quantised layer (kWqkv "...self_attn.qkv_proj.weight", kWGateUp
// "...mlp.gate_up_proj.weight"; kWk, kWv, kWUp without a name).
std::array<TensorSpec, kLayerTensorCount> layer_tensor_specs(const ModelConfig& cfg, int64_t il, bool fused = false);
// Returns the specs of the non-layer tensors, indexed by GlobalTensor (kLmHead has no name when tied).
std::array<TensorSpec, kGlobalTensorCount> global_tensor_specs(const ModelConfig& cfg);
// Returns true for checkpoint tensors that are known and deliberately unused (rotary caches).
bool is_ignored_tensor(const std::string& name);
// Returns a short name for a layer tensor ("wq", "ffn_norm", ...).
const char* layer_tensor_short_name(LayerTensor t);

// The weights of one layer as an executor sees them: views into whatever tier serves them.
struct LayerWeights {
  std::array<TensorView, kLayerTensorCount> t;
  const TensorView& operator[](LayerTensor i) const { return t[i]; }
  size_t nbytes() const;
};

// Fused weights. In a BF16 layer block q, k, v (and gate, up) are adjacent, so the GPU reads them as
// one [q_dim + 2 kv_dim, n_embd] (and [2 n_ff, n_embd]) weight through kWq's (kWGate's) pointer. A
// quantised layer (models/weight_format.h) stores them as one weight each, quantised together: kWqkv
// holds qkv with that shape, kWGateUp gate_up, and kWk, kWv, kWUp are empty.
inline constexpr LayerTensor kWqkv = kWq;
inline constexpr LayerTensor kWGateUp = kWGate;
inline bool is_fused_qkv(const LayerWeights& w) { return w[kWk].n_dims == 0 && w[kWqkv].n_dims == 2; }
inline bool is_fused_gate_up(const LayerWeights& w) { return w[kWUp].n_dims == 0 && w[kWGateUp].n_dims == 2; }
// The quantised format of a layer's Linear weights (kBF16 and the like when not quantised).
inline DType linear_dtype(const LayerWeights& w) { return w[kWDown].dtype; }

struct GlobalWeights {
  std::array<TensorView, kGlobalTensorCount> t;
  const TensorView& operator[](GlobalTensor i) const { return t[i]; }
};

}  // namespace ferry
