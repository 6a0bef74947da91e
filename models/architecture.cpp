#include "models/architecture.h"

namespace ferry {

std::array<TensorSpec, kLayerTensorCount> layer_tensor_specs(const ModelConfig& c, int64_t il, bool fused) {
  const std::string p = "model.layers." + std::to_string(il) + ".";
  std::array<TensorSpec, kLayerTensorCount> s;
  s[kAttnNorm] = {p + "input_layernorm.weight", {c.n_embd}};
  s[kWq] = {p + "self_attn.q_proj.weight", {c.q_dim(), c.n_embd}};
  s[kWk] = {p + "self_attn.k_proj.weight", {c.kv_dim(), c.n_embd}};
  s[kWv] = {p + "self_attn.v_proj.weight", {c.kv_dim(), c.n_embd}};
  if (c.attention_bias) {
    s[kBq] = {p + "self_attn.q_proj.bias", {c.q_dim()}};
    s[kBk] = {p + "self_attn.k_proj.bias", {c.kv_dim()}};
    s[kBv] = {p + "self_attn.v_proj.bias", {c.kv_dim()}};
  }
  s[kWo] = {p + "self_attn.o_proj.weight", {c.n_embd, c.q_dim()}};
  s[kFfnNorm] = {p + "post_attention_layernorm.weight", {c.n_embd}};
  s[kWGate] = {p + "mlp.gate_proj.weight", {c.n_ff, c.n_embd}};
  s[kWUp] = {p + "mlp.up_proj.weight", {c.n_ff, c.n_embd}};
  s[kWDown] = {p + "mlp.down_proj.weight", {c.n_embd, c.n_ff}};
  if (fused) {
    s[kWqkv] = {p + "self_attn.qkv_proj.weight", {c.q_dim() + 2 * c.kv_dim(), c.n_embd}};
    s[kWGateUp] = {p + "mlp.gate_up_proj.weight", {2 * c.n_ff, c.n_embd}};
    s[kWk] = s[kWv] = s[kWUp] = {};
  }
  return s;
}

std::array<TensorSpec, kGlobalTensorCount> global_tensor_specs(const ModelConfig& c) {
  std::array<TensorSpec, kGlobalTensorCount> s;
  s[kTokEmbd] = {"model.embed_tokens.weight", {c.n_vocab, c.n_embd}};
  s[kOutNorm] = {"model.norm.weight", {c.n_embd}};
  if (!c.tie_word_embeddings) s[kLmHead] = {"lm_head.weight", {c.n_vocab, c.n_embd}};
  else s[kLmHead] = {"", {c.n_vocab, c.n_embd}};
  return s;
}

bool is_ignored_tensor(const std::string& name) {
  return name.ends_with("rotary_emb.inv_freq") || name.ends_with(".masked_bias") || name.ends_with(".attn.bias");
}

const char* layer_tensor_short_name(LayerTensor t) {
  static const char* kNames[] = {"attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "ffn_norm", "w_gate", "w_up", "w_down"};
  return kNames[t];
}

size_t LayerWeights::nbytes() const {
  size_t n = 0;
  for (const auto& v : t)
    if (!v.empty()) n += v.nbytes();
  return n;
}

}  // namespace ferry
