#include "models/synthetic.h"

#include <cmath>

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "runtime/tensor.h"

namespace ferry {

namespace {

struct Preset {
  const char* name;
  Family family;
  int64_t n_embd, n_ff, n_layers, n_heads, n_kv_heads, n_vocab, n_ctx;
  double eps, theta;
  bool tied;
  int64_t sliding_window;
};

// Shapes from each model's published config.json.
constexpr Preset kPresets[] = {
    {"llama-2-7b", Family::kLlama, 4096, 11008, 32, 32, 32, 32000, 4096, 1e-5, 1e4, false, 0},
    {"llama-2-13b", Family::kLlama, 5120, 13824, 40, 40, 40, 32000, 4096, 1e-5, 1e4, false, 0},
    {"llama-3-8b", Family::kLlama, 4096, 14336, 32, 32, 8, 128256, 8192, 1e-5, 5e5, false, 0},
    {"llama-3-70b", Family::kLlama, 8192, 28672, 80, 64, 8, 128256, 8192, 1e-5, 5e5, false, 0},
    {"mistral-7b", Family::kMistral, 4096, 14336, 32, 32, 8, 32000, 32768, 1e-5, 1e4, false, 4096},
    {"qwen2.5-32b", Family::kQwen2, 5120, 27648, 64, 40, 8, 152064, 32768, 1e-6, 1e6, false, 0},
    // llama2.c's stories15M shape: small enough for a quick start on any CPU.
    {"stories15m", Family::kLlama, 288, 768, 6, 6, 6, 32000, 256, 1e-5, 1e4, true, 0},
};

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

std::vector<std::string> synthetic_preset_names() {
  std::vector<std::string> v;
  for (const auto& p : kPresets) v.emplace_back(p.name);
  return v;
}

Expected<ModelConfig> synthetic_config(const std::string& name, int64_t n_layers_override) {
  for (const auto& p : kPresets) {
    if (name != p.name) continue;
    ModelConfig c;
    c.family = p.family;
    c.architecture = p.family == Family::kQwen2 ? "Qwen2ForCausalLM" : p.family == Family::kMistral ? "MistralForCausalLM" : "LlamaForCausalLM";
    c.n_embd = p.n_embd;
    c.n_ff = p.n_ff;
    c.n_layers = n_layers_override > 0 ? n_layers_override : p.n_layers;
    c.n_heads = p.n_heads;
    c.n_kv_heads = p.n_kv_heads;
    c.head_dim = p.n_embd / p.n_heads;
    c.n_vocab = p.n_vocab;
    c.n_ctx_max = p.n_ctx;
    c.rms_norm_eps = p.eps;
    c.rope_theta = p.theta;
    c.tie_word_embeddings = p.tied;
    c.attention_bias = p.family == Family::kQwen2;
    c.sliding_window = p.sliding_window;
    c.dtype = DType::kBF16;
    c.bos_token_id = 1;
    c.eos_token_ids = {2};
    FERRY_RETURN_IF_ERROR(c.validate("synthetic:" + name));
    return c;
  }
  std::string names;
  for (const auto& p : kPresets) names += std::string(names.empty() ? "" : ", ") + p.name;
  return invalid_argument(strprintf("-m synthetic:%s: unknown preset (known: %s)", name.c_str(), names.c_str()));
}

uint64_t synthetic_key(const std::string& name) { return XXH64(name.data(), name.size(), 0x6665727279ull); }

float synthetic_scale(int64_t fan_in, bool is_norm) {
  // Uniform in [-a, a], a = sqrt(3 / fan_in): variance 1 / fan_in keeps activations O(1) through depth.
  return is_norm ? 0.1f : std::sqrt(3.0f / static_cast<float>(fan_in > 0 ? fan_in : 1));
}

void synthetic_fill_bf16(const std::string& name, int64_t fan_in, bool is_norm, uint64_t first, uint64_t n, uint16_t* out) {
  const uint64_t key = synthetic_key(name);
  const float a = synthetic_scale(fan_in, is_norm);
  for (uint64_t i = 0; i < n; ++i) {
    const uint64_t idx = first + i;
    const uint64_t h = splitmix64(key ^ (idx * 0xd1342543de82ef95ull));
    const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;  // [-1, 1)
    out[i] = f32_to_bf16(is_norm ? 1.0f + a * u : a * u);
  }
}

std::string synthetic_tokenizer_json(int64_t n_vocab) {
  using json = nlohmann::json;
  json vocab = json::object();
  vocab["<unk>"] = 0;
  vocab["<s>"] = 1;
  vocab["</s>"] = 2;
  for (int b = 0; b < 256; ++b) vocab[strprintf("<0x%02X>", b)] = 3 + b;
  static const char* kCons = "bcdfghjklmnprstvwz";
  static const char* kVow = "aeiou";
  const int n_c = 18, n_v = 5;
  // Then "▁" and printable ASCII, so typed text needs no byte fallback, then pseudo-words.
  int64_t next = 259;
  vocab["\xe2\x96\x81"] = next++;
  for (char c = '!'; c <= '~'; ++c) vocab[std::string(1, c)] = next++;
  for (int64_t id = next; id < n_vocab; ++id) {
    int64_t k = id - next;
    std::string w = "\xe2\x96\x81";  // U+2581, the SentencePiece space
    do {
      w += kCons[k % n_c];
      k /= n_c;
      w += kVow[k % n_v];
      k /= n_v;
    } while (k > 0);
    vocab[w] = id;
  }
  json added = json::array();
  const char* specials[] = {"<unk>", "<s>", "</s>"};
  for (int i = 0; i < 3; ++i)
    added.push_back({{"id", i}, {"content", specials[i]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  json j = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", {{"type", "Sequence"}, {"normalizers", json::array({{{"type", "Prepend"}, {"prepend", "\xe2\x96\x81"}},
                                                                         {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xe2\x96\x81"}}})}}},
      {"pre_tokenizer", nullptr},
      {"post_processor", {{"type", "TemplateProcessing"},
                          {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                          {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder", {{"type", "Sequence"}, {"decoders", json::array({{{"type", "Replace"}, {"pattern", {{"String", "\xe2\x96\x81"}}}, {"content", " "}},
                                                                    {{"type", "ByteFallback"}}, {{"type", "Fuse"}},
                                                                    {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}})}}},
      {"model", {{"type", "BPE"}, {"byte_fallback", true}, {"unk_token", "<unk>"}, {"fuse_unk", true}, {"vocab", vocab}, {"merges", json::array()}}},
  };
  return j.dump();
}

}  // namespace ferry
