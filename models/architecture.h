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

// Returns the specs of layer `il`, indexed by LayerTensor.
std::array<TensorSpec, kLayerTensorCount> layer_tensor_specs(const ModelConfig& cfg, int64_t il);
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

struct GlobalWeights {
  std::array<TensorView, kGlobalTensorCount> t;
  const TensorView& operator[](GlobalTensor i) const { return t[i]; }
};

}  // namespace ferry
