// Tokenizer: every case in ../shared/tokenizers/*/cases.json (ids without and with specials, and
// decode), the stories260K tokenizer against its golden prompt, and the streaming decoder.
#include <doctest/doctest.h>

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "models/synthetic.h"
#include "models/tokenizer.h"
#include "test_util.h"

using namespace ferry;
using json = nlohmann::json;

namespace {

std::string ids_str(const std::vector<int32_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  return s + "]";
}

void check_cases(const std::string& name) {
  const std::string dir = test::shared_dir() + "/tokenizers/" + name;
  auto tok = Tokenizer::from_file(dir + "/tokenizer.json");
  REQUIRE_MESSAGE(tok.ok(), tok.status().message());
  std::ifstream f(dir + "/cases.json");
  REQUIRE(f.good());
  std::stringstream ss;
  ss << f.rdbuf();
  json j = json::parse(ss.str());
  int n = 0;
  for (const auto& c : j["cases"]) {
    const std::string text = c["text"];
    CAPTURE(name);
    CAPTURE(text);
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    CHECK_MESSAGE(ids_str((*tok)->encode(text, false)) == ids_str(ids), "encode");
    if (c.contains("ids_with_specials")) {
      const auto with = c["ids_with_specials"].get<std::vector<int32_t>>();
      CHECK_MESSAGE(ids_str((*tok)->encode(text, true)) == ids_str(with), "encode with specials");
    }
    if (c.contains("decoded") && c["decoded"].is_string()) {
      CHECK_MESSAGE((*tok)->decode(ids) == c["decoded"].get<std::string>(), "decode");
    }
    ++n;
  }
  CHECK(n >= 10);
}

}  // namespace

TEST_SUITE("tokenizer") {
  TEST_CASE("llama2 (SentencePiece BPE, Prepend/Replace normalizer, byte fallback)") { check_cases("llama2"); }
  TEST_CASE("mistral (SentencePiece BPE, Metaspace pre-tokenizer)") { check_cases("mistral"); }
  TEST_CASE("llama3 (byte-level BPE, ignore_merges, regex with Unicode classes)") { check_cases("llama3"); }
  TEST_CASE("qwen2 (byte-level BPE, NFC)") { check_cases("qwen2"); }
  TEST_CASE("gpt2 (byte-level BPE with its own regex)") { check_cases("gpt2"); }

  TEST_CASE("stories260K tokenizer encodes the golden prompt") {
    const std::string dir = test::shared_dir() + "/models/stories260K";
    auto tok = Tokenizer::from_file(dir + "/tokenizer.json");
    REQUIRE(tok.ok());
    auto g = SafetensorsFile::open(dir + "/golden.safetensors");
    REQUIRE(g.ok());
    const auto want = test::read_i32(**g, "prompt.input_ids");
    CHECK(ids_str((*tok)->encode("Once upon a time, there was a little girl named Lily.", true)) == ids_str(want));
  }

  TEST_CASE("streaming decode never emits half a UTF-8 character and equals whole decode") {
    auto tok = Tokenizer::from_file(test::shared_dir() + "/tokenizers/llama2/tokenizer.json");
    REQUIRE(tok.ok());
    for (const std::string text : {"Hello, y'all! 😁 ?我想在apple工作", "🤖🎉👍🏽 naïve café", "  leading spaces", "a\r\nb"}) {
      const auto ids = (*tok)->encode(text, false);
      StreamDecoder d(**tok, true);
      std::string streamed;
      for (int32_t id : ids) {
        std::string piece = d.push(id);
        CHECK(utf8_lossy(piece) == piece);  // every piece is valid UTF-8 on its own
        streamed += piece;
      }
      streamed += d.flush();
      CHECK(streamed == (*tok)->decode(ids));
      CHECK(streamed == text);
    }
  }

  TEST_CASE("priming with a prompt keeps the continuation's leading space") {
    auto tok = Tokenizer::from_file(test::shared_dir() + "/tokenizers/llama2/tokenizer.json");
    REQUIRE(tok.ok());
    const auto ids = (*tok)->encode("Hello world", true);  // <s> ▁Hello ▁world
    StreamDecoder d(**tok, true);
    d.prime(std::span<const int32_t>(ids).first(2));
    CHECK(d.push(ids[2]) == " world");
    StreamDecoder fresh(**tok, true);
    CHECK(fresh.push(ids[1]) == "Hello");  // the first piece of a text loses its "▁"
  }

  TEST_CASE("utf8 helpers") {
    CHECK(utf8_lossy("ok") == "ok");
    CHECK(utf8_lossy("\xff") == "\xef\xbf\xbd");
    CHECK(utf8_lossy("a\xe2\x82") == "a\xef\xbf\xbd");
    CHECK(utf8_complete_prefix("a\xe2\x82") == 1);
    CHECK(utf8_complete_prefix("a\xe2\x82\xac") == 4);
    CHECK(utf8_complete_prefix("\xf0\x9f\x98") == 0);
  }

  TEST_CASE("synthetic tokenizer round-trips text through byte fallback") {
    auto tok = Tokenizer::from_json(synthetic_tokenizer_json(32000), "synthetic");
    REQUIRE_MESSAGE(tok.ok(), tok.status().message());
    const auto ids = (*tok)->encode("Hi é", true);
    CHECK(ids.front() == 1);
    CHECK((*tok)->decode(std::vector<int32_t>(ids.begin() + 1, ids.end())) == "Hi é");
  }

  TEST_CASE("malformed tokenizer.json is a clear error") {
    test::TempDir tmp;
    auto bad = [&](const std::string& text, const char* expect) {
      auto t = Tokenizer::from_json(text, "x/tokenizer.json");
      REQUIRE(!t.ok());
      CAPTURE(t.status().message());
      CHECK(t.status().message().find("x/tokenizer.json") != std::string::npos);
      CHECK(t.status().message().find(expect) != std::string::npos);
    };
    bad("{not json", "not a valid JSON");
    bad("{}", "missing 'model'");
    bad(R"({"model": {"type": "Unigram", "vocab": []}})", "Unigram");
    bad(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})", "merge #0");
    bad(R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Whatever"}})", "Whatever");
    bad(R"({"model": {"type": "BPE", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(["}, "behavior": "Isolated"}})", "regex");
    auto missing = Tokenizer::from_file(tmp / "nope.json");
    REQUIRE(!missing.ok());
    CHECK(missing.status().message().find("nope.json") != std::string::npos);
  }
}
