// ModelConfig: a model's hyper-parameters, read from a Hugging Face config.json (Llama, Mistral,
// Qwen2) or given by a synthetic preset. Run parameters (budgets, batch, sampling) live elsewhere.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/status.h"
#include "runtime/tensor.h"

namespace ferry {

enum class RopeType { kDefault, kLinear, kLlama3 };

struct RopeScaling {
  RopeType type = RopeType::kDefault;
  double factor = 1.0;                        // linear, llama3
  double low_freq_factor = 1.0;               // llama3
  double high_freq_factor = 4.0;              // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

enum class Family { kLlama, kMistral, kQwen2 };
std::string_view family_name(Family f);

struct ModelConfig {
  Family family = Family::kLlama;
  std::string architecture;  // "LlamaForCausalLM", ...
  int64_t n_embd = 0;        // hidden_size
  int64_t n_ff = 0;          // intermediate_size
  int64_t n_layers = 0;      // num_hidden_layers
  int64_t n_heads = 0;       // num_attention_heads
  int64_t n_kv_heads = 0;    // num_key_value_heads (GQA); = n_heads when absent
  int64_t head_dim = 0;      // explicit head_dim, else n_embd / n_heads
  int64_t n_vocab = 0;
  int64_t n_ctx_max = 0;     // max_position_embeddings
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // bias on q, k, v (always for Qwen2)
  int64_t sliding_window = 0;   // 0: full attention
  DType dtype = DType::kBF16;   // torch_dtype / dtype: what the checkpoint stores
  // A bitsandbytes checkpoint (config.json quantization_config: quant_method "bitsandbytes"): its
  // Linear weights are stored as NF4 (kNF4: load_in_4bit, nf4), NF4 with double-quantised absmax
  // (kNF4DQ, bnb_4bit_use_double_quant) or int8 rows with their absmax (kQ8: load_in_8bit); kBF16
  // otherwise.
  DType checkpoint_quant = DType::kBF16;
  // Its llm_int8_skip_modules: Linears it keeps in 16 or 32 bits (a module whose name contains one of
  // these). ferry's layers hold one format, so those are quantised at load to checkpoint_quant.
  std::vector<std::string> checkpoint_skip_modules;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
  // Returns the number of parameters (embedding and lm_head counted once when tied).
  int64_t n_params() const;
  // Checks the invariants between fields (divisibility, positivity); names the offending key.
  Status validate(const std::string& source) const;
};

// Reads `<dir>/config.json`.
Expected<ModelConfig> load_config(const std::string& dir);
// Parses config.json text; `path` is only used in messages.
Expected<ModelConfig> parse_config(const std::string& json_text, const std::string& path);

// Returns the rotary inverse frequencies [head_dim / 2] for `cfg`, with rope scaling applied and
// rounded to the checkpoint dtype, as transformers' rotary buffer is.
std::vector<float> rope_inv_freq(const ModelConfig& cfg);

}  // namespace ferry
