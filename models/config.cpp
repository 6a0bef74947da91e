#include "models/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace ferry {

using json = nlohmann::json;

std::string_view family_name(Family f) {
  switch (f) {
    case Family::kLlama: return "llama";
    case Family::kMistral: return "mistral";
    case Family::kQwen2: return "qwen2";
  }
  return "?";
}

int64_t ModelConfig::n_params() const {
  const int64_t attn = n_embd * q_dim() + 2 * n_embd * kv_dim() + q_dim() * n_embd +
                       (attention_bias ? q_dim() + 2 * kv_dim() : 0);
  const int64_t mlp = 3 * n_embd * n_ff;
  const int64_t norms = 2 * n_embd;
  const int64_t per_layer = attn + mlp + norms;
  const int64_t embd = n_vocab * n_embd;
  return n_layers * per_layer + embd + (tie_word_embeddings ? 0 : embd) + n_embd;
}

Status ModelConfig::validate(const std::string& source) const {
  auto bad = [&](const char* key, int64_t v) {
    return corrupt(strprintf("%s: '%s' must be positive (got %lld)", source.c_str(), key, static_cast<long long>(v)));
  };
  if (n_embd <= 0) return bad("hidden_size", n_embd);
  if (n_ff <= 0) return bad("intermediate_size", n_ff);
  if (n_layers <= 0) return bad("num_hidden_layers", n_layers);
  if (n_heads <= 0) return bad("num_attention_heads", n_heads);
  if (n_kv_heads <= 0) return bad("num_key_value_heads", n_kv_heads);
  if (head_dim <= 0) return bad("head_dim", head_dim);
  if (n_vocab <= 0) return bad("vocab_size", n_vocab);
  if (n_ctx_max <= 0) return bad("max_position_embeddings", n_ctx_max);
  if (n_heads % n_kv_heads != 0)
    return corrupt(strprintf("%s: num_attention_heads (%lld) is not a multiple of num_key_value_heads (%lld)",
                             source.c_str(), static_cast<long long>(n_heads), static_cast<long long>(n_kv_heads)));
  if (head_dim % 2 != 0)
    return corrupt(strprintf("%s: head_dim (%lld) must be even for rotary embeddings", source.c_str(),
                             static_cast<long long>(head_dim)));
  if (!(rms_norm_eps > 0) || !std::isfinite(rms_norm_eps))
    return corrupt(strprintf("%s: 'rms_norm_eps' must be a positive number", source.c_str()));
  if (!(rope_theta > 0) || !std::isfinite(rope_theta))
    return corrupt(strprintf("%s: 'rope_theta' must be a positive number", source.c_str()));
  if (!(rope_scaling.factor > 0))
    return corrupt(strprintf("%s: rope_scaling 'factor' must be positive", source.c_str()));
  // Bounds that keep every size product far from int64 overflow.
  const int64_t kMaxDim = int64_t{1} << 20;
  for (int64_t v : {n_embd, n_ff, n_heads, n_kv_heads, head_dim, n_vocab})
    if (v > kMaxDim) return corrupt(strprintf("%s: a dimension (%lld) is implausibly large", source.c_str(), static_cast<long long>(v)));
  if (n_layers > 4096) return corrupt(strprintf("%s: 'num_hidden_layers' %lld is implausibly large", source.c_str(), static_cast<long long>(n_layers)));
  if (n_ctx_max > (int64_t{1} << 24)) return corrupt(strprintf("%s: 'max_position_embeddings' is implausibly large", source.c_str()));
  return Status::Ok();
}

namespace {

// Reads an integer key; `required` keys that are absent are an error naming the key.
Status get_int(const json& j, const char* key, bool required, int64_t* out, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return corrupt(strprintf("%s: missing required key '%s'", path.c_str(), key));
    return Status::Ok();
  }
  if (!it->is_number_integer() && !it->is_number_unsigned())
    return corrupt(strprintf("%s: key '%s' must be an integer (got %s)", path.c_str(), key, it->dump().c_str()));
  *out = it->get<int64_t>();
  return Status::Ok();
}

Status get_double(const json& j, const char* key, double* out, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::Ok();
  if (!it->is_number()) return corrupt(strprintf("%s: key '%s' must be a number (got %s)", path.c_str(), key, it->dump().c_str()));
  *out = it->get<double>();
  return Status::Ok();
}

Status get_bool(const json& j, const char* key, bool* out, const std::string& path) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return Status::Ok();
  if (!it->is_boolean()) return corrupt(strprintf("%s: key '%s' must be true or false", path.c_str(), key));
  *out = it->get<bool>();
  return Status::Ok();
}

// quantization_config: bitsandbytes' 4-bit NF4 and 8-bit checkpoints are read as stored; anything
// else is refused naming what to run instead.
Status parse_quantization(const json& q, ModelConfig* cfg, const std::string& path) {
  if (q.is_null()) return Status::Ok();
  if (!q.is_object()) return corrupt(strprintf("%s: 'quantization_config' must be an object", path.c_str()));
  const auto str = [&](const char* key, const char* dflt) -> std::string {
    auto it = q.find(key);
    return it != q.end() && it->is_string() ? it->get<std::string>() : std::string(dflt);
  };
  const std::string method = str("quant_method", "");
  if (method != "bitsandbytes")
    return unsupported(strprintf("%s: quantization_config quant_method '%s' is not supported (ferry reads bitsandbytes 4-bit NF4 checkpoints; "
                                 "run the unquantised checkpoint with --quant nf4, nf4-dq or int8)",
                                 path.c_str(), method.c_str()));
  if (auto it = q.find("llm_int8_skip_modules"); it != q.end() && !it->is_null()) {
    if (!it->is_array()) return corrupt(strprintf("%s: quantization_config 'llm_int8_skip_modules' must be a list of module names", path.c_str()));
    for (const auto& m : *it) {
      if (!m.is_string() || m.get<std::string>().empty())
        return corrupt(strprintf("%s: quantization_config 'llm_int8_skip_modules' must be a list of module names (got %s)", path.c_str(), it->dump().c_str()));
      cfg->checkpoint_skip_modules.push_back(m.get<std::string>());
    }
  }
  bool in4 = false, in8 = false, dq = false;
  for (const char* k : {"load_in_4bit", "_load_in_4bit", "load_in_8bit", "_load_in_8bit"}) {  // transformers writes both spellings
    bool v = false;
    FERRY_RETURN_IF_ERROR(get_bool(q, k, &v, path));
    (std::string(k).find("4bit") != std::string::npos ? in4 : in8) |= v;
  }
  FERRY_RETURN_IF_ERROR(get_bool(q, "bnb_4bit_use_double_quant", &dq, path));
  if (in8) {  // LLM.int8's stored form: int8 rows and their absmax (SCB), ferry's int8 format
    bool fp16_weight = false;
    FERRY_RETURN_IF_ERROR(get_bool(q, "llm_int8_has_fp16_weight", &fp16_weight, path));
    if (fp16_weight)
      return unsupported(strprintf("%s: bitsandbytes 8-bit with llm_int8_has_fp16_weight keeps 16-bit weights; not supported", path.c_str()));
    cfg->checkpoint_quant = DType::kQ8;
    return Status::Ok();
  }
  if (!in4) return corrupt(strprintf("%s: quantization_config: bitsandbytes with neither load_in_4bit nor load_in_8bit", path.c_str()));
  const std::string type = str("bnb_4bit_quant_type", "fp4");  // bitsandbytes' default
  if (type != "nf4")
    return unsupported(strprintf("%s: bnb_4bit_quant_type '%s' is not supported (ferry reads nf4, QLoRA's)", path.c_str(), type.c_str()));
  const std::string storage = str("bnb_4bit_quant_storage", "uint8");
  if (storage != "uint8")
    return unsupported(strprintf("%s: bnb_4bit_quant_storage '%s' is not supported (uint8)", path.c_str(), storage.c_str()));
  cfg->checkpoint_quant = dq ? DType::kNF4DQ : DType::kNF4;
  return Status::Ok();
}

Status parse_rope(const json& rs, ModelConfig* cfg, const std::string& path) {
  if (rs.is_null()) return Status::Ok();
  if (!rs.is_object()) return corrupt(strprintf("%s: 'rope_scaling' must be an object", path.c_str()));
  std::string type;
  if (auto it = rs.find("rope_type"); it != rs.end() && it->is_string()) type = *it;
  else if (auto it2 = rs.find("type"); it2 != rs.end() && it2->is_string()) type = *it2;
  // transformers 5 keeps rope_theta inside rope_parameters / rope_scaling.
  FERRY_RETURN_IF_ERROR(get_double(rs, "rope_theta", &cfg->rope_theta, path));
  RopeScaling& r = cfg->rope_scaling;
  if (type.empty() || type == "default") {
    r.type = RopeType::kDefault;
  } else if (type == "linear") {
    r.type = RopeType::kLinear;
    if (!rs.contains("factor")) return corrupt(strprintf("%s: rope_scaling type 'linear' needs 'factor'", path.c_str()));
    FERRY_RETURN_IF_ERROR(get_double(rs, "factor", &r.factor, path));
  } else if (type == "llama3") {
    r.type = RopeType::kLlama3;
    for (const char* k : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
      if (!rs.contains(k)) return corrupt(strprintf("%s: rope_scaling type 'llama3' needs '%s'", path.c_str(), k));
    FERRY_RETURN_IF_ERROR(get_double(rs, "factor", &r.factor, path));
    FERRY_RETURN_IF_ERROR(get_double(rs, "low_freq_factor", &r.low_freq_factor, path));
    FERRY_RETURN_IF_ERROR(get_double(rs, "high_freq_factor", &r.high_freq_factor, path));
    FERRY_RETURN_IF_ERROR(get_int(rs, "original_max_position_embeddings", true, &r.original_max_position_embeddings, path));
    if (!(r.high_freq_factor > r.low_freq_factor))
      return corrupt(strprintf("%s: rope_scaling needs high_freq_factor > low_freq_factor", path.c_str()));
    if (r.original_max_position_embeddings <= 0)
      return corrupt(strprintf("%s: rope_scaling 'original_max_position_embeddings' must be positive", path.c_str()));
  } else {
    return unsupported(strprintf("%s: rope_scaling type '%s' is not supported (supported: default, linear, llama3)",
                                 path.c_str(), type.c_str()));
  }
  return Status::Ok();
}

}  // namespace

Expected<ModelConfig> parse_config(const std::string& text, const std::string& path) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return corrupt(strprintf("%s: not valid JSON", path.c_str()));
  if (!j.is_object()) return corrupt(strprintf("%s: expected a JSON object", path.c_str()));

  ModelConfig cfg;
  std::string model_type;
  if (auto it = j.find("model_type"); it != j.end() && it->is_string()) model_type = *it;
  if (auto it = j.find("architectures"); it != j.end() && it->is_array() && !it->empty() && (*it)[0].is_string())
    cfg.architecture = (*it)[0];
  if (model_type.empty() && cfg.architecture.empty())
    return corrupt(strprintf("%s: missing required key 'model_type' (and no 'architectures')", path.c_str()));
  if (model_type == "llama" || (model_type.empty() && cfg.architecture == "LlamaForCausalLM")) {
    cfg.family = Family::kLlama;
  } else if (model_type == "mistral" || (model_type.empty() && cfg.architecture == "MistralForCausalLM")) {
    cfg.family = Family::kMistral;
  } else if (model_type == "qwen2" || (model_type.empty() && cfg.architecture == "Qwen2ForCausalLM")) {
    cfg.family = Family::kQwen2;
    cfg.attention_bias = true;
  } else {
    return unsupported(strprintf("%s: unknown model_type '%s' (architecture '%s'); ferry supports llama, mistral, qwen2",
                                 path.c_str(), model_type.c_str(), cfg.architecture.c_str()));
  }
  static const char* kKnownArchs[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};
  if (!cfg.architecture.empty()) {
    bool known = false;
    for (const char* a : kKnownArchs) known |= cfg.architecture == a;
    if (!known)
      return unsupported(strprintf("%s: unknown architecture '%s' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)",
                                   path.c_str(), cfg.architecture.c_str()));
  } else {
    cfg.architecture = cfg.family == Family::kLlama ? "LlamaForCausalLM"
                       : cfg.family == Family::kMistral ? "MistralForCausalLM" : "Qwen2ForCausalLM";
  }

  FERRY_RETURN_IF_ERROR(get_int(j, "hidden_size", true, &cfg.n_embd, path));
  FERRY_RETURN_IF_ERROR(get_int(j, "intermediate_size", true, &cfg.n_ff, path));
  FERRY_RETURN_IF_ERROR(get_int(j, "num_hidden_layers", true, &cfg.n_layers, path));
  FERRY_RETURN_IF_ERROR(get_int(j, "num_attention_heads", true, &cfg.n_heads, path));
  FERRY_RETURN_IF_ERROR(get_int(j, "vocab_size", true, &cfg.n_vocab, path));
  cfg.n_kv_heads = cfg.n_heads;
  FERRY_RETURN_IF_ERROR(get_int(j, "num_key_value_heads", false, &cfg.n_kv_heads, path));
  cfg.n_ctx_max = 2048;
  FERRY_RETURN_IF_ERROR(get_int(j, "max_position_embeddings", false, &cfg.n_ctx_max, path));
  if (cfg.n_heads > 0) cfg.head_dim = cfg.n_embd / cfg.n_heads;
  FERRY_RETURN_IF_ERROR(get_int(j, "head_dim", false, &cfg.head_dim, path));
  if (!j.contains("head_dim") && cfg.n_heads > 0 && cfg.n_embd % cfg.n_heads != 0)
    return corrupt(strprintf("%s: hidden_size %lld is not a multiple of num_attention_heads %lld and no head_dim is given",
                             path.c_str(), static_cast<long long>(cfg.n_embd), static_cast<long long>(cfg.n_heads)));
  FERRY_RETURN_IF_ERROR(get_double(j, "rms_norm_eps", &cfg.rms_norm_eps, path));
  FERRY_RETURN_IF_ERROR(get_double(j, "rope_theta", &cfg.rope_theta, path));
  FERRY_RETURN_IF_ERROR(get_bool(j, "tie_word_embeddings", &cfg.tie_word_embeddings, path));
  if (cfg.family != Family::kQwen2) FERRY_RETURN_IF_ERROR(get_bool(j, "attention_bias", &cfg.attention_bias, path));
  bool mlp_bias = false;
  FERRY_RETURN_IF_ERROR(get_bool(j, "mlp_bias", &mlp_bias, path));
  if (mlp_bias) return unsupported(strprintf("%s: 'mlp_bias': true is not supported", path.c_str()));
  if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null() && *it != "silu")
    return unsupported(strprintf("%s: hidden_act %s is not supported (only silu)", path.c_str(), it->dump().c_str()));

  // Sliding window: Mistral sets it; Qwen2 only uses it with use_sliding_window.
  bool use_sw = cfg.family == Family::kMistral;
  FERRY_RETURN_IF_ERROR(get_bool(j, "use_sliding_window", &use_sw, path));
  if (use_sw) FERRY_RETURN_IF_ERROR(get_int(j, "sliding_window", false, &cfg.sliding_window, path));
  if (cfg.sliding_window < 0) return corrupt(strprintf("%s: 'sliding_window' must not be negative", path.c_str()));

  if (auto it = j.find("quantization_config"); it != j.end()) FERRY_RETURN_IF_ERROR(parse_quantization(*it, &cfg, path));
  if (auto it = j.find("rope_scaling"); it != j.end()) FERRY_RETURN_IF_ERROR(parse_rope(*it, &cfg, path));
  if (auto it = j.find("rope_parameters"); it != j.end()) FERRY_RETURN_IF_ERROR(parse_rope(*it, &cfg, path));

  std::string dtype = "bfloat16";
  for (const char* key : {"torch_dtype", "dtype"})
    if (auto it = j.find(key); it != j.end() && it->is_string()) dtype = *it;
  if (dtype == "bfloat16") cfg.dtype = DType::kBF16;
  else if (dtype == "float16") cfg.dtype = DType::kF16;
  else if (dtype == "float32") cfg.dtype = DType::kF32;
  else return unsupported(strprintf("%s: torch_dtype '%s' is not supported (bfloat16, float16, float32)", path.c_str(), dtype.c_str()));

  FERRY_RETURN_IF_ERROR(get_int(j, "bos_token_id", false, &cfg.bos_token_id, path));
  if (auto it = j.find("eos_token_id"); it != j.end()) {
    if (it->is_number_integer()) cfg.eos_token_ids.push_back(it->get<int64_t>());
    else if (it->is_array())
      for (const auto& e : *it)
        if (e.is_number_integer()) cfg.eos_token_ids.push_back(e.get<int64_t>());
  }
  FERRY_RETURN_IF_ERROR(cfg.validate(path));
  return cfg;
}

Expected<ModelConfig> load_config(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return not_found(strprintf("model directory '%s' does not exist", dir.c_str()));
  if (!fs::is_directory(dir, ec)) return invalid_argument(strprintf("'%s' is not a directory", dir.c_str()));
  const std::string path = (fs::path(dir) / "config.json").string();
  std::ifstream f(path, std::ios::binary);
  if (!f) return not_found(strprintf("%s: no config.json in the model directory", path.c_str()));
  std::stringstream ss;
  ss << f.rdbuf();
  return parse_config(ss.str(), path);
}

std::vector<float> rope_inv_freq(const ModelConfig& cfg) {
  const int64_t half = cfg.head_dim / 2;
  std::vector<float> inv(half);
  const RopeScaling& r = cfg.rope_scaling;
  for (int64_t i = 0; i < half; ++i) {
    // As transformers: base ** (2i / dim) in float32.
    const float expo = static_cast<float>(2 * i) / static_cast<float>(cfg.head_dim);
    float f = 1.0f / std::pow(static_cast<float>(cfg.rope_theta), expo);
    if (r.type == RopeType::kLinear) {
      f = f / static_cast<float>(r.factor);
    } else if (r.type == RopeType::kLlama3) {
      const double old_ctx = static_cast<double>(r.original_max_position_embeddings);
      const double low_wavelen = old_ctx / r.low_freq_factor;
      const double high_wavelen = old_ctx / r.high_freq_factor;
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / r.factor);
      } else if (wavelen >= high_wavelen) {
        const double smooth = (old_ctx / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / r.factor + smooth * f);
      }
    }
    // transformers builds this buffer in float32 and then casts the module to the checkpoint's
    // dtype, so a BF16 (F16) checkpoint rotates by BF16-rounded (F16-rounded) frequencies. Matching
    // that keeps ferry's logits equal to the reference (see notes/architecture.md).
    if (cfg.dtype == DType::kBF16) f = bf16_to_f32(f32_to_bf16(f));
    else if (cfg.dtype == DType::kF16) f = f16_to_f32(f32_to_f16(f));
    inv[i] = f;
  }
  return inv;
}

}  // namespace ferry
