// config.json parsing: families, GQA, explicit head_dim, rope_scaling types, transformers 5's
// rope_parameters, tied embeddings, attention bias, dtypes, and clear errors naming the key.
#include <doctest/doctest.h>

#include "models/config.h"
#include "test_util.h"

using namespace ferry;

namespace {
const char* kBase = R"({"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
  "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 128 %s})";
Expected<ModelConfig> parse(const std::string& extra) { return parse_config(strprintf(kBase, extra.c_str()), "dir/config.json"); }
std::string err(const std::string& text) {
  auto c = parse_config(text, "dir/config.json");
  REQUIRE(!c.ok());
  CHECK(c.status().message().find("dir/config.json") != std::string::npos);
  return c.status().message();
}
}  // namespace

TEST_SUITE("config") {
  TEST_CASE("the golden configs and stories260K parse as their families") {
    auto a = load_config(test::shared_dir() + "/golden/llama-gqa");
    REQUIRE(a.ok());
    CHECK(a->n_kv_heads == 2);
    CHECK(a->head_dim == 32);
    CHECK(!a->tie_word_embeddings);
    auto b = load_config(test::shared_dir() + "/golden/llama3-tied");
    REQUIRE(b.ok());
    CHECK(b->rope_scaling.type == RopeType::kLlama3);
    CHECK(b->rope_scaling.original_max_position_embeddings == 64);
    CHECK(b->tie_word_embeddings);
    auto c = load_config(test::shared_dir() + "/golden/qwen2-bias");
    REQUIRE(c.ok());
    CHECK(c->family == Family::kQwen2);
    CHECK(c->attention_bias);
    CHECK(c->rope_theta == 1e6);
    auto s = load_config(test::shared_dir() + "/models/stories260K");
    REQUIRE(s.ok());
    CHECK(s->dtype == DType::kF32);
  }

  TEST_CASE("explicit head_dim, linear rope, rope_parameters, mistral window, dtype") {
    auto c = parse(R"(, "head_dim": 64, "rope_scaling": {"type": "linear", "factor": 2.0})");
    REQUIRE(c.ok());
    CHECK(c->head_dim == 64);
    CHECK(c->q_dim() == 512);
    CHECK(c->rope_scaling.type == RopeType::kLinear);
    auto p = parse(R"(, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0})");
    REQUIRE(p.ok());
    CHECK(p->rope_theta == 123.0);
    auto m = parse_config(R"({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
      "num_attention_heads": 4, "vocab_size": 10, "sliding_window": 4096, "torch_dtype": "float16"})", "c");
    REQUIRE(m.ok());
    CHECK(m->family == Family::kMistral);
    CHECK(m->sliding_window == 4096);
    CHECK(m->n_kv_heads == 4);
    CHECK(m->dtype == DType::kF16);
  }

  TEST_CASE("errors name the file and the key") {
    CHECK(err("{").find("not valid JSON") != std::string::npos);
    CHECK(err(R"({"model_type": "gpt_neox"})").find("gpt_neox") != std::string::npos);
    CHECK(err(R"({"model_type": "llama", "architectures": ["FalconForCausalLM"]})").find("FalconForCausalLM") != std::string::npos);
    CHECK(err(R"({"model_type": "llama", "hidden_size": 64})").find("intermediate_size") != std::string::npos);
    CHECK(err(strprintf(kBase, R"(, "rope_scaling": {"rope_type": "yarn", "factor": 4})")).find("yarn") != std::string::npos);
    CHECK(err(strprintf(kBase, R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8})")).find("low_freq_factor") != std::string::npos);
    CHECK(err(R"({"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
      "num_attention_heads": 8, "num_key_value_heads": 3, "vocab_size": 1000})").find("num_key_value_heads") != std::string::npos);
    CHECK(err(R"({"model_type": "llama", "hidden_size": "big", "intermediate_size": 512, "num_hidden_layers": 2,
      "num_attention_heads": 8, "vocab_size": 1000})").find("hidden_size") != std::string::npos);
    CHECK(err(R"({"model_type": "llama", "hidden_size": -5, "intermediate_size": 512, "num_hidden_layers": 2,
      "num_attention_heads": 8, "vocab_size": 1000})").find("hidden_size") != std::string::npos);
    CHECK(err(strprintf(kBase, R"(, "torch_dtype": "int8")")).find("int8") != std::string::npos);
    CHECK(err(strprintf(kBase, R"(, "hidden_act": "gelu")")).find("gelu") != std::string::npos);
    auto missing = load_config("/nonexistent/model");
    REQUIRE(!missing.ok());
    CHECK(missing.status().message().find("/nonexistent/model") != std::string::npos);
  }
}
