// Serving: chat templates against transformers' renderings, the continuous-batching engine's
// submit / cancel, stop strings, and the OpenAI-compatible HTTP server end to end on stories260K.
#include <doctest/doctest.h>

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include <httplib.h>

#include <atomic>
#include <map>
#include <random>
#include <thread>

#include "cpu/cpu_executor.h"
#include "models/chat_template.h"
#include "runtime/engine.h"
#include "runtime/generate.h"
#include "runtime/model.h"
#include "runtime/openai.h"
#include "runtime/serve.h"
#include "runtime/server.h"
#include "test_util.h"

namespace ferry {
namespace {

using json = nlohmann::json;

json read_json(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return json::parse(ss.str(), nullptr, false);
}

std::vector<ChatMessage> messages_of(const json& j) {
  std::vector<ChatMessage> m;
  for (const auto& e : j) m.push_back({e["role"].get<std::string>(), e["content"].get<std::string>()});
  return m;
}

// stories260K on the CPU backend, K/V for `kv_tokens`.
struct Stories {
  Model model;
  std::unique_ptr<cpu::CpuExecutor> ex;
  std::unique_ptr<KvCache> kv;
  std::unique_ptr<Runner> runner;
  explicit Stories(int64_t kv_tokens = 1024) {
    auto m = load_model(test::shared_dir() + "/models/stories260K", LoadOptions{});
    REQUIRE_MESSAGE(m.ok(), m.status().message());
    model = std::move(*m);
    ex = std::make_unique<cpu::CpuExecutor>(model.config);
    auto k = KvCache::create({model.config.n_layers, model.config.n_kv_heads, model.config.head_dim, 16, kv_tokens / 16, DType::kF32});
    REQUIRE(k.ok());
    kv = std::make_unique<KvCache>(std::move(*k));
    runner = std::make_unique<Runner>(*model.weights, *ex, *kv);
  }
  std::vector<int32_t> encode(const std::string& text) const { return model.tokenizer->encode(text, true); }
  // The tokens `prompt` gets alone through generate().
  std::vector<int32_t> alone(const std::vector<int32_t>& prompt, int64_t n, const SamplingParams& sp, bool stop_at_eos = true) {
    GenerateOptions go;
    go.n_predict = n;
    go.sampling = sp;
    go.stop_at_eos = stop_at_eos;
    auto r = generate(*runner, {prompt}, go);
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    return r->tokens[0];
  }
  std::string text(const std::vector<int32_t>& prompt, const std::vector<int32_t>& ids) const {
    StreamDecoder d(*model.tokenizer, true);
    d.prime(prompt);
    std::string out;
    for (int32_t t : ids) out += d.push(t);
    return out + d.flush();
  }
};

const SamplingParams kGreedy{0.0f, 0, 1.0f, 0};

}  // namespace

TEST_SUITE("serve") {
  TEST_CASE("stop strings: the text ends before the first one; a possible start is held back, never lost") {
    StopMatcher m({"END", "\n\n"});
    CHECK(m.push("Hello E") == "Hello ");  // "E" may start "END"
    CHECK(m.push("x") == "Ex");
    CHECK(m.push("ample\n") == "ample");
    CHECK(m.push("more") == "\nmore");
    CHECK(!m.stopped());
    CHECK(m.push(" fiEN") == " fi");
    CHECK(m.push("D tail") == "");
    CHECK(m.stopped());
    CHECK(m.push("after") == "");
    CHECK(m.flush() == "");
    StopMatcher n({"abc"});
    CHECK(n.push("xab") == "x");
    CHECK(n.flush() == "ab");  // the stream ended: what was held back is text
    StopMatcher none({});
    CHECK(none.push("anything") == "anything");
    // Two stop strings in one piece: the earlier wins.
    StopMatcher two({"zz", "y"});
    CHECK(two.push("ab y zz") == "ab ");
  }

  TEST_CASE("engine: requests join a running batch with their own sampling; cancelled ones free their blocks") {
    Stories s;
    const int64_t free0 = s.kv->n_free_blocks();
    const std::vector<std::string> texts = {"Once upon a time", "The little dog", "Lily and Tom went", "One day, a bird", "The sun was"};
    std::vector<std::vector<int32_t>> p;
    for (const auto& t : texts) p.push_back(s.encode(t));
    const SamplingParams warm{0.9f, 0, 1.0f, 7}, topk{1.0f, 10, 0.9f, 3};
    const auto ref0 = s.alone(p[0], 20, kGreedy), ref2 = s.alone(p[2], 12, kGreedy), ref3 = s.alone(p[3], 16, topk);
    const auto ref1 = s.alone(p[1], 30, warm);
    REQUIRE(s.kv->n_free_blocks() == free0);

    Engine e(*s.runner, EngineOptions{3, 64, false});
    REQUIRE(e.validate_options().ok());
    auto make = [&](int i, int64_t n, SamplingParams sp) {
      EngineRequest r;
      r.prompt = p[i];
      r.max_tokens = n;
      r.sampling = sp;
      return r;
    };
    std::map<int64_t, std::vector<int32_t>> got;
    std::map<int64_t, FinishReason> why;
    std::vector<EngineEvent> ev;
    auto step = [&] {
      REQUIRE(e.step(ev).ok());
      for (const auto& x : ev) {
        if (x.token >= 0) got[x.id].push_back(x.token);
        if (x.finish != FinishReason::kNone) why[x.id] = x.finish;
      }
    };
    auto id0 = e.submit(make(0, 20, kGreedy)), id1 = e.submit(make(1, 30, warm));
    REQUIRE((id0.ok() && id1.ok()));
    step();
    step();
    // Two more while those run; the batch holds 3, so the fourth waits; a fifth is cancelled while queued.
    auto id2 = e.submit(make(2, 12, kGreedy)), id3 = e.submit(make(3, 16, topk)), id4 = e.submit(make(4, 8, kGreedy));
    REQUIRE((id2.ok() && id3.ok() && id4.ok()));
    CHECK(e.n_queued() == 3);
    step();
    CHECK(e.n_live() == 3);
    e.cancel(*id4);
    for (int i = 0; i < 3; ++i) step();
    e.cancel(*id1);  // live: cut after 6 tokens (one a step)
    for (int guard = 0; !e.idle() && guard < 200; ++guard) step();
    CHECK(e.idle());
    CHECK(got[*id0] == ref0);
    CHECK(got[*id2] == ref2);
    CHECK(got[*id3] == ref3);
    CHECK(why[*id0] == FinishReason::kLength);
    CHECK(why[*id4] == FinishReason::kCancelled);
    CHECK(got[*id4].empty());
    CHECK(why[*id1] == FinishReason::kCancelled);
    REQUIRE(got[*id1].size() == 6);
    CHECK(std::equal(got[*id1].begin(), got[*id1].end(), ref1.begin()));
    CHECK(s.kv->n_free_blocks() == free0);
    // A stop id ends a request as EOS does.
    EngineRequest r = make(0, 20, kGreedy);
    r.stop_ids = {ref0[3]};
    auto id5 = e.submit(r);
    REQUIRE(id5.ok());
    for (int guard = 0; !e.idle() && guard < 50; ++guard) step();
    CHECK(got[*id5] == std::vector<int32_t>(ref0.begin(), ref0.begin() + 4));
    CHECK(why[*id5] == FinishReason::kStopId);
    // A conversation's next turn continues the kept sequence: only the new tokens are prefilled,
    // and the tokens equal a fresh request's over the whole prompt. A shorter shared prefix (the
    // sequence cut back) too.
    {
      EngineRequest a = make(0, 10, kGreedy);
      a.keep_sequence = true;
      auto ida = e.submit(a);
      REQUIRE(ida.ok());
      int32_t kept = -1;
      for (int guard = 0; !e.idle() && guard < 50; ++guard) {
        REQUIRE(e.step(ev).ok());
        for (const auto& x : ev) {
          got[x.id].push_back(x.token);
          if (x.kept_seq >= 0) kept = x.kept_seq;
        }
      }
      REQUIRE(kept >= 0);
      REQUIRE(got[*ida].size() == 10);
      CHECK(s.kv->length(kept) == static_cast<int64_t>(p[0].size()) + 9);  // the last token was drawn, not fed
      for (int64_t shared : {static_cast<int64_t>(p[0].size()) + 9, static_cast<int64_t>(p[0].size()) - 2}) {
        CAPTURE(shared);
        std::vector<int32_t> full = p[0];
        full.insert(full.end(), got[*ida].begin(), got[*ida].begin() + 9);
        full.resize(static_cast<size_t>(shared));
        full.insert(full.end(), p[1].begin() + 1, p[1].end());  // a new turn (without its BOS)
        const auto fresh = s.alone(full, 12, kGreedy);
        EngineRequest b = make(0, 12, kGreedy);
        b.prompt = full;
        b.keep_sequence = true;
        b.continue_seq = kept;
        b.continue_len = shared;
        auto idb = e.submit(b);
        REQUIRE_MESSAGE(idb.ok(), idb.status().message());
        std::vector<int32_t> cont;
        for (int guard = 0; !e.idle() && guard < 50; ++guard) {
          REQUIRE(e.step(ev).ok());
          for (const auto& x : ev) {
            cont.push_back(x.token);
            if (x.kept_seq >= 0) CHECK(x.kept_seq == kept);
          }
        }
        CHECK(cont == fresh);
        // Its length is now the prompt and all but the last reply token: the next turn's prefix.
        CHECK(s.kv->length(kept) == static_cast<int64_t>(full.size() + cont.size()) - 1);
        // Truncate back to the kept turn's state for the second round.
        s.kv->set_length(kept, static_cast<int64_t>(p[0].size()) + 9);
      }
      // A continue_len past what the sequence holds is refused.
      EngineRequest c = make(0, 4, kGreedy);
      c.continue_seq = kept;
      c.continue_len = static_cast<int64_t>(c.prompt.size());
      CHECK(!e.submit(c).ok());
      e.drop_sequence(kept);
      CHECK(s.kv->n_free_blocks() == free0);
    }
    // Refusals: the vocabulary, the context, the cache.
    EngineRequest bad = make(0, 4, kGreedy);
    bad.prompt.push_back(100000);
    CHECK(!e.submit(bad).ok());
    bad = make(0, 100000, kGreedy);
    CHECK(!e.submit(bad).ok());
    bad = make(0, 4, SamplingParams{-1.0f, 0, 1.0f, 0});
    CHECK(!e.submit(bad).ok());
    CHECK(e.idle());
  }

  TEST_CASE("chat templates: each family renders as transformers renders the real template; the rest are refused") {
    const json cases = read_json(test::data_dir() + "/chat/cases.json");
    REQUIRE(cases.is_object());
    int n_checked = 0, n_refused = 0;
    for (const auto& fam : cases["families"]) {
      const std::string name = fam["format"];
      CAPTURE(name);
      std::string source;
      if (fam.contains("config")) {
        const json cfg = read_json(test::shared_dir() + "/" + fam["config"].get<std::string>());
        REQUIRE(cfg.is_object());
        source = cfg["chat_template"];
      } else {
        source = fam["template"];
      }
      auto t = ChatTemplate::detect(source, fam["bos_token"], fam["eos_token"], name);
      REQUIRE_MESSAGE(t.ok(), t.status().message());
      CHECK(std::string(chat_format_name(t->format)) == name);
      for (const auto& c : fam["cases"]) {
        const auto msgs = messages_of(c["messages"]);
        CAPTURE(c["messages"].dump());
        auto text = t->render(msgs, c["add_generation_prompt"].get<bool>());
        if (c.contains("error")) {
          CHECK(!text.ok());
          ++n_refused;
        } else {
          REQUIRE_MESSAGE(text.ok(), text.status().message());
          CHECK(*text == c["text"].get<std::string>());
          ++n_checked;
        }
      }
    }
    CHECK(n_checked >= 40);
    CHECK(n_refused >= 5);

    // From a model directory: tokenizer_config.json's template and tokens; --chat-template overrides.
    test::TempDir d;
    const std::string llama3 = test::shared_dir() + "/tokenizers/llama3/tokenizer_config.json";
    std::filesystem::copy_file(llama3, d / "tokenizer_config.json");
    auto t = ChatTemplate::from_model_dir(d.path.string());
    REQUIRE_MESSAGE(t.ok(), t.status().message());
    CHECK(t->format == ChatFormat::kLlama3);
    CHECK(t->end_of_turn() == std::vector<std::string>{"<|eot_id|>"});
    auto z = ChatTemplate::from_model_dir(d.path.string(), "zephyr");
    REQUIRE(z.ok());
    CHECK(z->format == ChatFormat::kZephyr);
    CHECK(z->eos_token == "<|end_of_text|>");
    auto bad = ChatTemplate::from_model_dir(d.path.string(), "jinja");
    REQUIRE(!bad.ok());
    CHECK(bad.status().message().find("--chat-template jinja") != std::string::npos);
    // chat_template.jinja wins over tokenizer_config.json (transformers 5 writes it so).
    {
      std::ofstream(d / "chat_template.jinja") << "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}{% if add_generation_prompt %}x{% endif %}";
    }
    t = ChatTemplate::from_model_dir(d.path.string());
    REQUIRE(t.ok());
    CHECK(t->format == ChatFormat::kChatML);
    CHECK(t->default_system.empty());

    // No template at all: the error names the directory and the flag.
    test::TempDir empty;
    auto none = ChatTemplate::from_model_dir(empty.path.string());
    REQUIRE(!none.ok());
    CHECK(none.status().message().find("--chat-template") != std::string::npos);
    // A template of a family ferry does not render, and Llama-3.1's dated header, are refused.
    for (const char* src : {"{% for m in messages %}<start_of_turn>{{ m.role }}{% endfor %}",
                            "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023"}) {
      auto r = ChatTemplate::detect(src, "<s>", "</s>", "x.json");
      REQUIRE(!r.ok());
      CHECK(r.status().message().find("x.json") != std::string::npos);
      CHECK(r.status().message().find("--chat-template") != std::string::npos);
    }
    // A default system message spelled out in a ChatML template (Qwen2.5's form) is kept.
    auto q = ChatTemplate::detect(
        "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
        "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        "", "<|im_end|>", "qwen2.5");
    REQUIRE(q.ok());
    CHECK(q->default_system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.");
    // Roles beyond system / user / assistant, and an empty conversation, are refused by every format.
    const std::vector<ChatMessage> tool = {{"user", "x"}, {"tool", "y"}};
    CHECK(!q->render(tool, true).ok());
    CHECK(!q->render({}, true).ok());
  }

  TEST_CASE("server: OpenAI's API over HTTP on stories260K: the text generate() gives, streamed or whole, concurrent, stopped, refused") {
    Stories s(2048);
    const ModelConfig& cfg = s.model.config;
    // References first: the runner is the server's once it starts.
    const std::vector<std::string> texts = {"Once upon a time", "The little dog", "Lily and Tom went", "One day, a bird", "The sun was", "Tom had a"};
    std::vector<std::vector<int32_t>> prompts, refs;
    for (size_t i = 0; i < texts.size(); ++i) {
      prompts.push_back(s.encode(texts[i]));
      const SamplingParams sp = i % 2 ? SamplingParams{0.8f, 20, 0.9f, 100 + i} : kGreedy;
      refs.push_back(s.alone(prompts.back(), 24 + 4 * static_cast<int64_t>(i), sp));
    }
    auto zephyr = ChatTemplate::detect("<|user|> <|assistant|>", "<s>", "</s>", "zephyr");
    REQUIRE(zephyr.ok());
    const std::vector<ChatMessage> conv = {{"user", "Tell me a story about a cat."}};
    auto rendered = zephyr->render(conv, true);
    REQUIRE(rendered.ok());
    const std::vector<int32_t> chat_prompt = s.model.tokenizer->encode(*rendered, false);
    const std::vector<int32_t> chat_ref = s.alone(chat_prompt, 48, kGreedy);
    // The log-probabilities of request 0's greedy tokens, from the logits of the whole sequence.
    std::vector<float> ref_lp, ref_prompt_lp;
    {
      std::vector<int32_t> seq = prompts[0];
      seq.insert(seq.end(), refs[0].begin(), refs[0].end() - 1);
      auto lg = prompt_logits(*s.runner, seq);
      REQUIRE(lg.ok());
      for (size_t j = 0; j < refs[0].size(); ++j)
        ref_lp.push_back(token_logprob(lg->data() + (prompts[0].size() - 1 + j) * cfg.n_vocab, cfg.n_vocab, refs[0][j]));
      for (size_t j = 1; j < prompts[0].size(); ++j) ref_prompt_lp.push_back(token_logprob(lg->data() + (j - 1) * cfg.n_vocab, cfg.n_vocab, prompts[0][j]));
    }

    ServerOptions so;
    so.port = 0;
    so.ctx = 256;
    so.engine = EngineOptions{4, 128, false, /*prefix_cache=*/true};
    so.model_id = "stories260K";
    so.chat = *zephyr;
    std::mutex log_mu;
    std::vector<std::string> logs;
    so.log = [&](const std::string& l) {
      std::lock_guard lk(log_mu);
      logs.push_back(l);
    };
    const int64_t free0 = s.kv->n_free_blocks();
    Server srv(*s.runner, *s.model.tokenizer, so);
    auto port = srv.start();
    REQUIRE_MESSAGE(port.ok(), port.status().message());
    auto post = [&](const std::string& path, const json& body) {
      httplib::Client c("127.0.0.1", *port);
      c.set_read_timeout(60);
      auto r = c.Post(path, body.dump(), "application/json");
      REQUIRE(r);
      return std::make_pair(r->status, json::parse(r->body, nullptr, false));
    };
    // Server-sent events: the data lines, in order.
    auto post_stream = [&](const std::string& path, const json& body) {
      httplib::Client c("127.0.0.1", *port);
      c.set_read_timeout(60);
      auto r = c.Post(path, body.dump(), "application/json");
      REQUIRE(r);
      CHECK(r->status == 200);
      CHECK(r->get_header_value("Content-Type").find("text/event-stream") == 0);
      std::vector<std::string> data;
      std::istringstream in(r->body);
      for (std::string line; std::getline(in, line);)
        if (line.rfind("data: ", 0) == 0) data.push_back(line.substr(6));
      return data;
    };
    auto completion = [&](size_t i, bool stream) {
      json b = {{"model", "whatever"}, {"prompt", texts[i]}, {"max_tokens", 24 + 4 * i}};
      if (i % 2) b.update({{"temperature", 0.8}, {"top_k", 20}, {"top_p", 0.9}, {"seed", 100 + i}});
      else b["temperature"] = 0;
      b["stream"] = stream;
      return b;
    };

    SUBCASE("health, models, whole and streamed completions, concurrent requests") {
      httplib::Client c("127.0.0.1", *port);
      auto h = c.Get("/health");
      REQUIRE(h);
      CHECK(h->status == 200);
      auto m = c.Get("/v1/models");
      REQUIRE(m);
      const json mj = json::parse(m->body);
      CHECK(mj["data"][0]["id"] == "stories260K");
      CHECK(mj["data"][0]["max_model_len"] == 256);

      auto [st, r] = post("/v1/completions", completion(0, false));
      REQUIRE(st == 200);
      CHECK(r["object"] == "text_completion");
      CHECK(r["model"] == "stories260K");
      CHECK(r["choices"][0]["text"] == s.text(prompts[0], refs[0]));
      CHECK(r["choices"][0]["finish_reason"] == (refs[0].size() == 24 ? "length" : "stop"));
      CHECK(r["usage"]["prompt_tokens"] == prompts[0].size());
      CHECK(r["usage"]["completion_tokens"] == refs[0].size());
      // A prompt given as token ids.
      json ids_body = completion(0, false);
      ids_body["prompt"] = prompts[0];
      auto [st_ids, r_ids] = post("/v1/completions", ids_body);
      REQUIRE(st_ids == 200);
      CHECK(r_ids["choices"][0]["text"] == r["choices"][0]["text"]);
      // The same prompt again: its full blocks come from the prefix cache (a 5-token prompt has
      // none); a longer prompt that starts the same way shares its first blocks.
      CHECK(r_ids["usage"]["prompt_tokens_details"]["cached_tokens"] == 0);
      std::string long_text;
      for (int k = 0; k < 6; ++k) long_text += texts[k] + ". ";
      const auto long_ids = s.model.tokenizer->encode(long_text, true);
      REQUIRE(long_ids.size() > 33);
      auto [st_l1, r_l1] = post("/v1/completions", {{"prompt", long_text}, {"max_tokens", 8}, {"temperature", 0}});
      auto [st_l2, r_l2] = post("/v1/completions", {{"prompt", long_text}, {"max_tokens", 8}, {"temperature", 0}});
      REQUIRE((st_l1 == 200 && st_l2 == 200));
      CHECK(r_l1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0);
      CHECK(r_l2["usage"]["prompt_tokens_details"]["cached_tokens"] == (long_ids.size() - 1) / 16 * 16);
      CHECK(r_l2["choices"][0]["text"] == r_l1["choices"][0]["text"]);

      json sb = completion(1, true);
      sb["stream_options"] = {{"include_usage", true}};
      const auto data = post_stream("/v1/completions", sb);
      REQUIRE(data.size() >= 4);
      CHECK(data.back() == "[DONE]");
      std::string streamed;
      int n_finish = 0;
      for (size_t k = 0; k + 1 < data.size(); ++k) {
        const json j = json::parse(data[k]);
        if (j["choices"].empty()) {  // the usage chunk, last
          CHECK(k + 2 == data.size());
          CHECK(j["usage"]["completion_tokens"] == refs[1].size());
          continue;
        }
        streamed += j["choices"][0]["text"].get<std::string>();
        n_finish += !j["choices"][0]["finish_reason"].is_null();
      }
      CHECK(n_finish == 1);
      CHECK(streamed == s.text(prompts[1], refs[1]));

      // Six at once into a batch of four: each gets what it gets alone, half of them streamed.
      std::vector<std::string> got(texts.size());
      std::vector<std::thread> th;
      for (size_t i = 0; i < texts.size(); ++i)
        th.emplace_back([&, i] {
          if (i % 3 == 0) {
            std::string t;
            const auto d = post_stream("/v1/completions", completion(i, true));
            for (const auto& line : d)
              if (line != "[DONE]") t += json::parse(line)["choices"][0]["text"].get<std::string>();
            got[i] = t;
          } else {
            auto [code, j] = post("/v1/completions", completion(i, false));
            got[i] = code == 200 ? j["choices"][0]["text"].get<std::string>() : "HTTP " + std::to_string(code);
          }
        });
      for (auto& t : th) t.join();
      for (size_t i = 0; i < texts.size(); ++i) {
        CAPTURE(i);
        CHECK(got[i] == s.text(prompts[i], refs[i]));
      }
    }

    SUBCASE("stop strings and chat") {
      const std::string full = s.text(prompts[0], refs[0]);
      const size_t at = full.find("Lily");
      REQUIRE(at != std::string::npos);
      json b = completion(0, false);
      b["stop"] = json::array({"Lily", "zzz"});
      auto [st, r] = post("/v1/completions", b);
      REQUIRE(st == 200);
      CHECK(r["choices"][0]["text"] == full.substr(0, at));
      CHECK(r["choices"][0]["finish_reason"] == "stop");
      // Streamed, the held-back start of a stop string never shows.
      b["stream"] = true;
      std::string streamed;
      for (const auto& line : post_stream("/v1/completions", b))
        if (line != "[DONE]") streamed += json::parse(line)["choices"][0]["text"].get<std::string>();
      CHECK(streamed == full.substr(0, at));

      // Chat: the zephyr format around the message, the reply up to EOS.
      json cb = {{"messages", {{{"role", "user"}, {"content", conv[0].content}}}}, {"max_tokens", 48}, {"temperature", 0}};
      auto [cst, cr] = post("/v1/chat/completions", cb);
      REQUIRE(cst == 200);
      CHECK(cr["object"] == "chat.completion");
      CHECK(cr["choices"][0]["message"]["role"] == "assistant");
      CHECK(cr["choices"][0]["message"]["content"] == s.text(chat_prompt, chat_ref));
      CHECK(cr["usage"]["prompt_tokens"] == chat_prompt.size());
      cb["stream"] = true;
      std::string reply;
      const auto data = post_stream("/v1/chat/completions", cb);
      REQUIRE(data.size() >= 3);
      CHECK(json::parse(data[0])["choices"][0]["delta"]["role"] == "assistant");
      CHECK(json::parse(data[0])["object"] == "chat.completion.chunk");
      for (const auto& line : data)
        if (line != "[DONE]") reply += json::parse(line)["choices"][0]["delta"].value("content", "");
      CHECK(reply == s.text(chat_prompt, chat_ref));
    }

    SUBCASE("log-probabilities: the model's own, per generated token, with alternatives; whole and streamed; completions and chat") {
      json b = completion(0, false);
      b["logprobs"] = 3;
      auto [st, r] = post("/v1/completions", b);
      REQUIRE(st == 200);
      const json& lp = r["choices"][0]["logprobs"];
      REQUIRE(lp["token_logprobs"].size() == refs[0].size());
      REQUIRE(lp["tokens"].size() == refs[0].size());
      for (size_t j = 0; j < refs[0].size(); ++j) {
        CAPTURE(j);
        CHECK(lp["token_logprobs"][j].get<double>() == doctest::Approx(ref_lp[j]).epsilon(1e-4));
        CHECK(lp["top_logprobs"][j].size() <= 3);
        // Greedy: the chosen token is the most likely one.
        double best = -1e30;
        for (const auto& [k, v] : lp["top_logprobs"][j].items()) best = std::max(best, v.get<double>());
        CHECK(lp["token_logprobs"][j].get<double>() == doctest::Approx(best));
        CHECK(lp["tokens"][j] == utf8_lossy(s.model.tokenizer->token_bytes(refs[0][j])));
      }
      CHECK(lp["text_offset"][0] == 0);
      // Streamed: the chunks carry them all.
      b["stream"] = true;
      size_t n = 0;
      for (const auto& line : post_stream("/v1/completions", b))
        if (line != "[DONE]") {
          const json j = json::parse(line);
          if (!j["choices"][0]["logprobs"].is_null()) n += j["choices"][0]["logprobs"]["token_logprobs"].size();
        }
      CHECK(n == refs[0].size());
      // Chat: logprobs true, top_logprobs N.
      json cb = {{"messages", {{{"role", "user"}, {"content", conv[0].content}}}}, {"max_tokens", 48}, {"temperature", 0}, {"logprobs", true}, {"top_logprobs", 2}};
      auto [cst, cr] = post("/v1/chat/completions", cb);
      REQUIRE(cst == 200);
      const json& content = cr["choices"][0]["logprobs"]["content"];
      CHECK(content.size() == chat_ref.size());
      CHECK(content[0]["top_logprobs"].size() == 2);
      CHECK(content[0]["bytes"].is_array());
      CHECK(content[0]["logprob"].get<double>() <= 0);
      // Echo, as lm-evaluation-harness asks for a loglikelihood (token ids, logprobs 1, max_tokens
      // 1): the prompt's tokens with theirs (the first has none), then the generated one.
      json eb = {{"prompt", prompts[0]}, {"max_tokens", 1}, {"temperature", 0}, {"logprobs", 1}, {"echo", true}};
      auto [est, er] = post("/v1/completions", eb);
      REQUIRE(est == 200);
      const json& el = er["choices"][0]["logprobs"];
      const size_t np = prompts[0].size();
      REQUIRE(el["token_logprobs"].size() == np + 1);
      CHECK(el["token_logprobs"][0].is_null());
      CHECK(el["top_logprobs"][0].is_null());
      for (size_t j = 1; j < np; ++j) {
        CAPTURE(j);
        CHECK(el["token_logprobs"][j].get<double>() == doctest::Approx(ref_prompt_lp[j - 1]).epsilon(1e-4));
        REQUIRE(el["top_logprobs"][j].size() == 1);
        CHECK(el["top_logprobs"][j].begin().value().get<double>() >= el["token_logprobs"][j].get<double>() - 1e-6);
      }
      CHECK(el["token_logprobs"][np].get<double>() == doctest::Approx(ref_lp[0]).epsilon(1e-4));
      CHECK(er["choices"][0]["text"] == s.model.tokenizer->decode(prompts[0], true) + s.text(prompts[0], {refs[0][0]}));
      CHECK(er["usage"]["completion_tokens"] == 1);
      // Echo alone prepends the prompt as given; echo does not stream in this version.
      auto [e0, r0] = post("/v1/completions", {{"prompt", texts[0]}, {"max_tokens", 3}, {"temperature", 0}, {"echo", true}});
      REQUIRE(e0 == 200);
      CHECK(r0["choices"][0]["text"].get<std::string>().rfind(texts[0], 0) == 0);
      CHECK(r0["choices"][0]["logprobs"].is_null());
      auto [e3, r3] = post("/v1/completions", {{"prompt", texts[0]}, {"echo", true}, {"stream", true}});
      CHECK(e3 == 400);
      // Without logprobs there are none; bad values are refused.
      auto [pst, pr] = post("/v1/completions", completion(0, false));
      REQUIRE(pst == 200);
      CHECK(pr["choices"][0]["logprobs"].is_null());
      auto [e1, r1] = post("/v1/completions", {{"prompt", "x"}, {"logprobs", 50}});
      CHECK(e1 == 400);
      auto [e2, r2] = post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"top_logprobs", 2}});
      CHECK(e2 == 400);
      CHECK(r2["error"]["message"].get<std::string>().find("'top_logprobs'") != std::string::npos);
    }

    SUBCASE("refusals name the parameter; a client that leaves mid-stream frees its request") {
      auto expect_400 = [&](const std::string& path, const json& body, const std::string& mentions) {
        CAPTURE(body.dump());
        auto [st, r] = post(path, body);
        CHECK(st == 400);
        const std::string msg = r["error"]["message"].get<std::string>();
        CHECK_MESSAGE(msg.find(mentions) != std::string::npos, msg);
        CHECK(r["error"]["type"] == "invalid_request_error");
      };
      expect_400("/v1/completions", {{"prompt", "x"}, {"n", 2}}, "'n'");
      expect_400("/v1/completions", {{"prompt", "x"}, {"suffix", "y"}}, "'suffix'");
      expect_400("/v1/completions", {{"prompt", "x"}, {"presence_penalty", 0.5}}, "'presence_penalty'");
      expect_400("/v1/completions", {{"prompt", "x"}, {"temperature", 3}}, "'temperature'");
      expect_400("/v1/completions", {{"prompt", "x"}, {"max_tokens", 0}}, "'max_tokens'");
      expect_400("/v1/completions", {{"prompt", "x"}, {"max_tokens", 1000}}, "--ctx");
      expect_400("/v1/completions", {{"prompt", "x"}, {"stop", json::array({"a", "b", "c", "d", "e"})}}, "'stop'");
      expect_400("/v1/completions", {{"prompt", json::array({"a", "b"})}}, "one prompt per request");
      expect_400("/v1/completions", {{"prompt", json::array({1, 2, 999999})}}, "vocabulary");
      expect_400("/v1/completions", {{"max_tokens", 4}}, "'prompt'");
      expect_400("/v1/chat/completions", {{"messages", json::array()}}, "'messages'");
      expect_400("/v1/chat/completions", {{"messages", {{{"role", "tool"}, {"content", "x"}}}}}, "tool");
      expect_400("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"tools", json::array({json::object()})}}, "'tools'");
      {
        httplib::Client c("127.0.0.1", *port);
        auto r = c.Post("/v1/completions", "{not json", "application/json");
        REQUIRE(r);
        CHECK(r->status == 400);
        auto g = c.Get("/v2/nothing");
        REQUIRE(g);
        CHECK(g->status == 404);
        CHECK(json::parse(g->body)["error"]["message"].get<std::string>().find("/v2/nothing") != std::string::npos);
      }
      // The client reads one event and hangs up; the request stops long before max_tokens.
      const int64_t before = srv.counters().generated_tokens;
      {
        httplib::Client c("127.0.0.1", *port);
        httplib::Request q;
        q.method = "POST";
        q.path = "/v1/completions";
        q.body = json{{"prompt", texts[0]}, {"max_tokens", 240}, {"temperature", 0.5}, {"ignore_eos", true}, {"stream", true}}.dump();
        q.set_header("Content-Type", "application/json");
        int chunks = 0;
        q.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 2; };
        c.send(q);
        CHECK(chunks == 2);
      }
      ServerCounters cc;
      for (int i = 0; i < 500; ++i) {
        cc = srv.counters();
        if (cc.live == 0 && cc.queued == 0 && cc.generated_tokens > before) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      CHECK(cc.live == 0);
      CHECK(cc.generated_tokens - before < 120);
    }
    srv.stop();
    CHECK(s.kv->n_free_blocks() == free0);  // every request's blocks came back
    std::lock_guard lk(log_mu);
    CHECK(!logs.empty());
  }

  TEST_CASE("server: --api-key guards /v1 and /metrics (not /health); /metrics counts in Prometheus' format") {
    Stories s(512);
    ServerOptions so;
    so.port = 0;
    so.ctx = 128;
    so.engine = EngineOptions{2, 64, false};
    so.api_key = "sekret";
    Server srv(*s.runner, *s.model.tokenizer, so);
    auto port = srv.start();
    REQUIRE(port.ok());
    httplib::Client c("127.0.0.1", *port);
    auto h = c.Get("/health");
    REQUIRE(h);
    CHECK(h->status == 200);
    for (const char* path : {"/v1/models", "/metrics"}) {
      auto r = c.Get(path);
      REQUIRE(r);
      CHECK(r->status == 401);
      CHECK(json::parse(r->body)["error"]["code"] == "invalid_api_key");
    }
    auto wrong = c.Post("/v1/completions", httplib::Headers{{"Authorization", "Bearer nope"}}, R"({"prompt": "Hi", "max_tokens": 3})", "application/json");
    REQUIRE(wrong);
    CHECK(wrong->status == 401);
    const httplib::Headers key = {{"Authorization", "Bearer sekret"}};
    auto ok = c.Post("/v1/completions", key, R"({"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})", "application/json");
    REQUIRE(ok);
    CHECK(ok->status == 200);
    auto m = c.Get("/metrics", key);
    REQUIRE(m);
    CHECK(m->status == 200);
    CHECK(m->body.find("# TYPE ferry_requests_total counter\nferry_requests_total 1\n") != std::string::npos);
    CHECK(m->body.find("ferry_generation_tokens_total 5\n") != std::string::npos);
    CHECK(m->body.find("ferry_requests_running 0\n") != std::string::npos);
    srv.stop();
  }

  TEST_CASE("prefix cache: freed blocks stay cached under their hash, shared by reference, evicted least recently freed first") {
    auto kv = KvCache::create({1, 1, 2, 4, 6, DType::kF32});
    REQUIRE(kv.ok());
    const int32_t a = kv->add_sequence();
    REQUIRE(kv->reserve(a, 10).ok());  // 3 blocks
    kv->set_length(a, 10);
    kv->register_block(a, 0, 11);
    kv->register_block(a, 1, 22);
    kv->register_block(a, 2, 33);  // not full (10 tokens): refused
    const int32_t b0 = kv->block_table(a)[0], b1 = kv->block_table(a)[1];
    CHECK(kv->n_free_blocks() == 3);
    kv->free_sequence(a);
    CHECK(kv->n_free_blocks() == 6);
    CHECK(kv->n_cached_blocks() == 2);
    // A new sequence takes the cached run up to the first miss; two share the same blocks.
    const int32_t b = kv->add_sequence(), c = kv->add_sequence();
    const std::vector<uint64_t> h = {11, 22, 99};
    CHECK(kv->share_prefix(b, h) == 2);
    CHECK(kv->length(b) == 8);
    CHECK(kv->block_table(b) == std::vector<int32_t>{b0, b1});
    CHECK(kv->share_prefix(c, std::vector<uint64_t>{11, 77}) == 1);
    CHECK(kv->n_cached_blocks() == 0);
    kv->free_sequence(b);
    CHECK(kv->n_cached_blocks() == 1);  // block b0 is still c's
    kv->free_sequence(c);
    CHECK(kv->n_cached_blocks() == 2);
    // The pool takes free blocks first, then evicts the least recently freed cached block (b1,
    // freed before b0), whose hash then misses.
    const int32_t d = kv->add_sequence();
    REQUIRE(kv->reserve(d, 20).ok());  // 5 blocks: 4 free + 1 evicted
    CHECK(kv->n_cached_blocks() == 1);
    const int32_t e = kv->add_sequence();
    CHECK(kv->share_prefix(e, std::vector<uint64_t>{11, 22}) == 1);
    CHECK(!kv->reserve(d, 24).ok());  // full: e holds the last block
    kv->free_sequence(d);
    kv->free_sequence(e);
    CHECK(kv->n_free_blocks() == 6);
  }

  TEST_CASE("engine with the prefix cache: a prompt that starts as an earlier one prefills only the rest, and gets the tokens it gets alone") {
    Stories s(512);  // 32 blocks
    std::string text;
    for (const char* t : {"Once upon a time, there was a little girl.", " She liked to play.", " One day she found a ball.", " It was red.", " Her mom was happy to see it."}) text += t;
    const std::vector<int32_t> base = s.encode(text);
    REQUIRE(base.size() >= 40);
    std::vector<int32_t> other = base;
    other.resize(36);
    const auto tail = s.encode(" The dog ran to the park");
    other.insert(other.end(), tail.begin() + 1, tail.end());
    const auto ref_base = s.alone(base, 20, kGreedy, false), ref_other = s.alone(other, 20, kGreedy, false);
    // A turn after the first: its prompt is the first prompt and reply (blocks made while decoding).
    std::vector<int32_t> turn2 = base;
    turn2.insert(turn2.end(), ref_base.begin(), ref_base.end() - 1);
    turn2.insert(turn2.end(), tail.begin() + 1, tail.end());
    const auto ref_turn2 = s.alone(turn2, 12, kGreedy, false);
    const int64_t free0 = s.kv->n_free_blocks();

    Engine e(*s.runner, EngineOptions{2, 64, false, /*prefix_cache=*/true});
    auto run = [&](const std::vector<int32_t>& prompt, int64_t n, int64_t* cached) {
      EngineRequest r;
      r.prompt = prompt;
      r.max_tokens = n;
      r.sampling = kGreedy;
      r.stop_at_eos = false;
      auto id = e.submit(r);
      REQUIRE(id.ok());
      std::vector<int32_t> out;
      std::vector<EngineEvent> ev;
      while (!e.idle()) {
        REQUIRE(e.step(ev).ok());
        for (const auto& x : ev) out.push_back(x.token), *cached = x.cached_tokens;
      }
      return out;
    };
    int64_t cached = -1;
    CHECK(run(base, 20, &cached) == ref_base);
    CHECK(cached == 0);
    CHECK(run(base, 20, &cached) == ref_base);
    CHECK(cached == static_cast<int64_t>((base.size() - 1) / 16 * 16));
    CHECK(run(other, 20, &cached) == ref_other);
    CHECK(cached == 32);  // two blocks: the third differs at token 36
    CHECK(run(turn2, 12, &cached) == ref_turn2);
    CHECK(cached == static_cast<int64_t>((base.size() + ref_base.size() - 1) / 16 * 16));
    CHECK(e.stats().cached_prompt_tokens > 0);
    CHECK(s.kv->n_cached_blocks() > 0);
    CHECK(s.kv->n_free_blocks() == free0);  // cached blocks count as free
    // Requests that need the whole pool evict the cache; the first prompt is then prefilled anew.
    std::vector<int32_t> big(480, 0);
    for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<int32_t>(3 + (i * 37) % 500);
    run(big, 16, &cached);
    CHECK(run(base, 20, &cached) == ref_base);
    CHECK(cached == 0);
  }

  TEST_CASE("server under load: 24 clients, streamed and whole, hanging up at random, stop strings; every request answered or cancelled, every block back") {
    Stories s(4096);
    ServerOptions so;
    so.port = 0;
    so.ctx = 256;
    so.engine = EngineOptions{6, 96, false, /*prefix_cache=*/true};
    so.n_http_threads = 8;  // fewer than the clients: connections wait for a handler
    Server srv(*s.runner, *s.model.tokenizer, so);
    auto port = srv.start();
    REQUIRE(port.ok());
    const int64_t free0 = s.kv->n_free_blocks();
    std::atomic<int> answered{0}, hung_up{0}, bad{0};
    std::mutex why_mu;
    std::string why;  // what the failed ones got (doctest's macros are for the main thread)
    std::vector<std::thread> th;
    for (int c = 0; c < 24; ++c)
      th.emplace_back([&, c] {
        std::mt19937 rng(static_cast<uint32_t>(c));
        for (int k = 0; k < 4; ++k) {
          httplib::Client cl("127.0.0.1", *port);
          cl.set_read_timeout(120);
          const int kind = static_cast<int>(rng() % 4);
          json b = {{"prompt", k % 2 ? "Once upon a time" : "The little dog"}, {"max_tokens", 20 + rng() % 60}, {"temperature", 0.9}, {"seed", c * 10 + k}};
          if (kind == 2) b["stop"] = json::array({"the", "."});
          b["stream"] = kind != 0;
          httplib::Request q;
          q.method = "POST";
          q.path = "/v1/completions";
          q.body = b.dump();
          q.set_header("Content-Type", "application/json");
          const int leave_after = kind == 3 ? 1 + static_cast<int>(rng() % 5) : 1 << 30;
          int chunks = 0;
          std::string body;
          q.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
            body.append(d, n);
            return ++chunks < leave_after;
          };
          auto r = cl.send(q);
          if (kind == 3 && chunks >= leave_after) {
            ++hung_up;
          } else if (r && r->status == 200 && (kind == 0 ? json::parse(body, nullptr, false).contains("choices") : body.find("data: [DONE]") != std::string::npos)) {
            ++answered;
          } else {
            ++bad;
            std::lock_guard lk(why_mu);
            why += "kind " + std::to_string(kind) + ": " + (r ? "HTTP " + std::to_string(r->status) : httplib::to_string(r.error())) + "; ";
          }
        }
      });
    for (auto& t : th) t.join();
    CHECK_MESSAGE(bad == 0, why);
    CHECK(answered + hung_up == 96);
    ServerCounters c;
    for (int i = 0; i < 500; ++i) {
      c = srv.counters();
      if (c.live == 0 && c.queued == 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    CHECK(c.live == 0);
    CHECK(c.queued == 0);
    CHECK(c.requests == 96);
    srv.stop();
    CHECK(s.kv->n_free_blocks() == free0);
  }

  TEST_CASE("engine echo: every prompt token's log-probability, across prefill chunks and beside other requests, then the generated tokens as alone") {
    Stories s(1024);
    std::string text;
    for (int k = 0; k < 4; ++k) text += "Once upon a time, there was a little girl named Lily. She liked to play. ";
    const std::vector<int32_t> p = s.encode(text), q = s.encode("The little dog");
    REQUIRE(p.size() > 64);
    const auto ref = s.alone(p, 6, kGreedy, false), ref_q = s.alone(q, 30, kGreedy, false);
    auto lg = prompt_logits(*s.runner, p);
    REQUIRE(lg.ok());
    const int64_t V = s.model.config.n_vocab;
    Engine e(*s.runner, EngineOptions{2, 40, false, true});  // the prompt spans several steps
    EngineRequest r, other;
    r.prompt = p;
    r.max_tokens = 6;
    r.sampling = kGreedy;
    r.stop_at_eos = false;
    r.logprobs = 2;
    r.prompt_logprobs = true;
    other.prompt = q;
    other.max_tokens = 30;
    other.sampling = kGreedy;
    other.stop_at_eos = false;
    auto io = e.submit(other), ir = e.submit(r);
    REQUIRE((io.ok() && ir.ok()));
    std::vector<EngineEvent> ev;
    std::vector<EngineEvent> echoed;
    std::map<int64_t, std::vector<int32_t>> gen;
    while (!e.idle()) {
      REQUIRE(e.step(ev).ok());
      for (const auto& x : ev) {
        if (x.prompt) {
          CHECK(x.id == *ir);
          CHECK(gen[x.id].empty());  // before any generated token
          echoed.push_back(x);
        } else {
          gen[x.id].push_back(x.token);
        }
      }
    }
    REQUIRE(echoed.size() == p.size() - 1);
    for (size_t j = 1; j < p.size(); ++j) {
      CAPTURE(j);
      CHECK(echoed[j - 1].token == p[j]);
      CHECK(echoed[j - 1].logprob == doctest::Approx(token_logprob(lg->data() + (j - 1) * V, V, p[j])).epsilon(1e-4));
      CHECK(echoed[j - 1].top.size() == 2);
    }
    CHECK(gen[*ir] == ref);
    CHECK(gen[*io] == ref_q);
    CHECK(e.stats().cached_prompt_tokens == 0);
  }

  TEST_CASE("throughput mode with the prefix cache: requests submitted together with one system prompt wait for its first block, then share it") {
    Stories s(2048);
    std::string sys;
    for (int k = 0; k < 3; ++k) sys += "You are a kind storyteller who tells short tales. ";
    const std::vector<int32_t> head = s.encode(sys);
    REQUIRE(head.size() >= 33);
    std::vector<ServeRequest> reqs;
    std::vector<std::vector<int32_t>> refs;
    for (const char* t : {"Tell me about a cat.", "A dog and a ball.", "The sun and the moon.", "Lily went to the park.", "A big red car."}) {
      ServeRequest r;
      r.prompt = head;
      const auto tail = s.encode(t);
      r.prompt.insert(r.prompt.end(), tail.begin() + 1, tail.end());
      r.max_tokens = 12;
      refs.push_back(s.alone(r.prompt, 12, kGreedy, false));
      reqs.push_back(std::move(r));
    }
    ServeOptions so;
    so.batch = 5;
    so.max_step_tokens = 256;
    so.sampling = kGreedy;
    so.stop_at_eos = false;
    so.prefix_cache = true;
    std::vector<ServeResult> got;
    auto st = serve(*s.runner, reqs, so, got);
    REQUIRE_MESSAGE(st.ok(), st.status().message());
    for (size_t i = 0; i < reqs.size(); ++i) {
      CAPTURE(i);
      CHECK(got[i].tokens == refs[i]);
    }
    // The four after the first share the system prompt's full blocks.
    const int64_t shared_blocks = static_cast<int64_t>(head.size()) / 16;
    CHECK(st->cached_prompt_tokens >= 4 * shared_blocks * 16);
    // Without the cache, none.
    so.prefix_cache = false;
    auto off = serve(*s.runner, reqs, so, got);
    REQUIRE(off.ok());
    CHECK(off->cached_prompt_tokens == 0);
  }
}

}  // namespace ferry
