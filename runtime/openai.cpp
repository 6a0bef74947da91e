#include "runtime/openai.h"

#include <algorithm>
#include <cmath>

#include <nlohmann/json.hpp>

namespace ferry {

namespace {

using json = nlohmann::json;

Status bad(const std::string& param, const std::string& why) { return invalid_argument("'" + param + "': " + why); }

// A number parameter, or `dflt` when absent or null.
Expected<double> number(const json& body, const char* key, double dflt) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return dflt;
  if (!it->is_number()) return bad(key, "must be a number, not " + it->dump());
  const double v = it->get<double>();
  if (!std::isfinite(v)) return bad(key, "must be finite");
  return v;
}

Expected<int64_t> integer(const json& body, const char* key, int64_t dflt) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return dflt;
  if (!it->is_number_integer()) return bad(key, "must be an integer, not " + it->dump());
  return it->get<int64_t>();
}

Expected<bool> boolean(const json& body, const char* key, bool dflt) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) return bad(key, "must be true or false, not " + it->dump());
  return it->get<bool>();
}

// Refuses parameters ferry does not implement unless they carry their neutral value.
Status refuse_unsupported(const json& body, bool chat) {
  auto given = [&](const char* key) {
    auto it = body.find(key);
    return it != body.end() && !it->is_null();
  };
  FERRY_ASSIGN_OR_RETURN(const int64_t n, integer(body, "n", 1));
  if (n != 1) return bad("n", "ferry returns one choice per request (n = 1); send the request n times with different seeds");
  FERRY_ASSIGN_OR_RETURN(const int64_t best_of, integer(body, "best_of", 1));
  if (best_of != 1) return bad("best_of", "not supported (only 1)");
  for (const char* key : {"presence_penalty", "frequency_penalty"}) {
    FERRY_ASSIGN_OR_RETURN(const double v, number(body, key, 0.0));
    if (v != 0.0) return bad(key, "not supported by ferry's sampler (only 0)");
  }
  FERRY_ASSIGN_OR_RETURN(const double rep, number(body, "repetition_penalty", 1.0));
  if (rep != 1.0) return bad("repetition_penalty", "not supported by ferry's sampler (only 1)");
  if (given("logit_bias") && !(body["logit_bias"].is_object() && body["logit_bias"].empty())) return bad("logit_bias", "not supported");
  if (given("tools") || given("functions") || given("tool_choice") || given("function_call"))
    return bad(given("tools") ? "tools" : given("functions") ? "functions" : given("tool_choice") ? "tool_choice" : "function_call",
               "tool calls are not supported");
  if (given("response_format")) {
    const json& rf = body["response_format"];
    if (!(rf.is_object() && rf.value("type", "") == "text")) return bad("response_format", "only {\"type\": \"text\"} is supported");
  }
  if (!chat && given("suffix")) return bad("suffix", "insertion (suffix) is not supported");
  return Status::Ok();
}

Expected<std::vector<ChatMessage>> parse_messages(const json& body) {
  auto it = body.find("messages");
  if (it == body.end() || !it->is_array() || it->empty()) return bad("messages", "must be a non-empty array of {\"role\", \"content\"} objects");
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < it->size(); ++i) {
    const json& m = (*it)[i];
    const std::string where = strprintf("messages[%zu]", i);
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) return bad(where, "needs a \"role\" string");
    ChatMessage cm;
    cm.role = m["role"].get<std::string>();
    if (cm.role == "developer") cm.role = "system";  // OpenAI's newer name for it
    if (cm.role != "system" && cm.role != "user" && cm.role != "assistant") return bad(where + ".role", "\"" + cm.role + "\" is not supported (system, user, assistant)");
    const json& c = m.contains("content") ? m["content"] : json();
    if (c.is_string()) {
      cm.content = c.get<std::string>();
    } else if (c.is_array()) {  // content parts: text only
      for (size_t k = 0; k < c.size(); ++k) {
        const json& part = c[k];
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
          return bad(strprintf("%s.content[%zu]", where.c_str(), k), "only {\"type\": \"text\", \"text\": ...} parts are supported");
        cm.content += part["text"].get<std::string>();
      }
    } else {
      return bad(where + ".content", "must be a string or an array of text parts");
    }
    out.push_back(std::move(cm));
  }
  return out;
}

}  // namespace

Expected<CompletionRequest> parse_completion_request(const json& body, bool chat, const Tokenizer& tok, const ChatTemplate* tmpl,
                                                     const ModelConfig& cfg, const CompletionLimits& limits) {
  if (!body.is_object()) return invalid_argument("the request body must be a JSON object");
  FERRY_RETURN_IF_ERROR(refuse_unsupported(body, chat));
  CompletionRequest r;
  r.chat = chat;
  if (chat) {
    if (tmpl == nullptr)
      return invalid_argument("this model has no chat template ferry can render: start the server with --chat-template NAME (" + chat_format_names() +
                              "), or use /v1/completions");
    FERRY_ASSIGN_OR_RETURN(const std::vector<ChatMessage> msgs, parse_messages(body));
    auto text = tmpl->render(msgs, /*add_generation_prompt=*/true);
    if (!text.ok()) return bad("messages", text.status().message());
    r.prompt = tok.encode(*text, /*add_special=*/false);
  } else {
    auto it = body.find("prompt");
    if (it == body.end()) return bad("prompt", "missing");
    const json* p = &*it;
    if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) p = &(*p)[0];
    if (p->is_array() && p->size() == 1 && (*p)[0].is_array()) p = &(*p)[0];
    if (p->is_string()) {
      r.prompt_text = p->get<std::string>();
      r.prompt = tok.encode(r.prompt_text, /*add_special=*/true);
    } else if (p->is_array() && !p->empty() && std::all_of(p->begin(), p->end(), [](const json& v) { return v.is_number_integer(); })) {
      for (const json& v : *p) {
        const int64_t id = v.get<int64_t>();
        if (id < 0 || id >= cfg.n_vocab) return bad("prompt", strprintf("token id %lld is outside the vocabulary (%lld)", (long long)id, (long long)cfg.n_vocab));
        r.prompt.push_back(static_cast<int32_t>(id));
      }
      r.prompt_text = tok.decode(r.prompt, /*skip_special=*/true);
    } else if (p->is_array() && p->size() > 1) {
      return bad("prompt", "one prompt per request (send a request for each)");
    } else {
      return bad("prompt", "must be a string or an array of token ids");
    }
    if (r.prompt.empty() && cfg.bos_token_id >= 0) r.prompt.push_back(static_cast<int32_t>(cfg.bos_token_id));
    if (r.prompt.empty()) return bad("prompt", "empty, and the model has no BOS token to start from");
  }
  const int64_t n_prompt = static_cast<int64_t>(r.prompt.size());
  if (n_prompt >= limits.ctx)
    return bad(chat ? "messages" : "prompt", strprintf("%lld tokens leave no room in the context of %lld tokens (the server's --ctx)", (long long)n_prompt,
                                                       (long long)limits.ctx));
  // max_completion_tokens is the chat API's newer name.
  FERRY_ASSIGN_OR_RETURN(int64_t max_tokens, integer(body, "max_tokens", -1));
  if (chat) {
    FERRY_ASSIGN_OR_RETURN(const int64_t mct, integer(body, "max_completion_tokens", -1));
    if (mct >= 0) max_tokens = mct;
  }
  if (max_tokens == -1) {
    max_tokens = chat ? (limits.default_chat_max_tokens > 0 ? std::min(limits.default_chat_max_tokens, limits.ctx - n_prompt) : limits.ctx - n_prompt)
                      : 16;  // OpenAI's default for completions
    max_tokens = std::min(max_tokens, limits.ctx - n_prompt);
  }
  if (max_tokens < 1) return bad("max_tokens", strprintf("must be at least 1 (got %lld)", (long long)max_tokens));
  if (n_prompt + max_tokens > limits.ctx)
    return bad("max_tokens", strprintf("%lld prompt tokens + %lld completion tokens pass the context of %lld tokens (the server's --ctx)", (long long)n_prompt,
                                       (long long)max_tokens, (long long)limits.ctx));
  r.max_tokens = max_tokens;
  // Sampling: OpenAI's defaults (temperature 1, top_p 1, no top-k).
  FERRY_ASSIGN_OR_RETURN(const double temp, number(body, "temperature", 1.0));
  if (temp < 0 || temp > 2) return bad("temperature", strprintf("must be in [0, 2] (got %g)", temp));
  FERRY_ASSIGN_OR_RETURN(const double top_p, number(body, "top_p", 1.0));
  if (!(top_p > 0 && top_p <= 1)) return bad("top_p", strprintf("must be in (0, 1] (got %g)", top_p));
  FERRY_ASSIGN_OR_RETURN(int64_t top_k, integer(body, "top_k", 0));
  if (top_k == -1) top_k = 0;  // vLLM's "no limit"
  if (top_k < 0) return bad("top_k", "must be >= 0 (or -1: no limit)");
  auto seed_it = body.find("seed");
  uint64_t seed = limits.default_seed;
  if (seed_it != body.end() && !seed_it->is_null()) {
    if (!seed_it->is_number_integer()) return bad("seed", "must be an integer");
    seed = static_cast<uint64_t>(seed_it->get<int64_t>());
  }
  r.sampling = SamplingParams{static_cast<float>(temp), top_k, static_cast<float>(top_p), seed};
  FERRY_ASSIGN_OR_RETURN(r.ignore_eos, boolean(body, "ignore_eos", false));
  if (auto it = body.find("stop"); it != body.end() && !it->is_null()) {
    if (it->is_string()) {
      r.stop.push_back(it->get<std::string>());
    } else if (it->is_array() && it->size() <= 4 && std::all_of(it->begin(), it->end(), [](const json& v) { return v.is_string(); })) {
      for (const json& v : *it) r.stop.push_back(v.get<std::string>());
    } else {
      return bad("stop", "must be a string or an array of up to 4 strings");
    }
    for (const std::string& s : r.stop)
      if (s.empty()) return bad("stop", "a stop string must not be empty");
  }
  // Log-probabilities: completions' "logprobs": N (alternatives, 0-20); chat's "logprobs": true
  // with "top_logprobs": N.
  if (chat) {
    FERRY_ASSIGN_OR_RETURN(const bool lp, boolean(body, "logprobs", false));
    FERRY_ASSIGN_OR_RETURN(const int64_t top, integer(body, "top_logprobs", -1));
    if (top != -1 && !lp) return bad("top_logprobs", "needs \"logprobs\": true");
    if (top < -1 || top > 20) return bad("top_logprobs", "must be in [0, 20]");
    r.logprobs = lp ? std::max<int64_t>(top, 0) : -1;
  } else {
    const bool off = body.contains("logprobs") && body["logprobs"].is_boolean() && !body["logprobs"].get<bool>();
    FERRY_ASSIGN_OR_RETURN(const int64_t lp, off ? Expected<int64_t>(int64_t{-1}) : integer(body, "logprobs", -1));
    if (lp < -1 || lp > 20) return bad("logprobs", "must be an integer in [0, 20] (the alternatives returned per token)");
    r.logprobs = lp;
  }
  FERRY_ASSIGN_OR_RETURN(r.stream, boolean(body, "stream", false));
  if (!chat) {
    FERRY_ASSIGN_OR_RETURN(r.echo, boolean(body, "echo", false));
    if (r.echo && r.stream) return bad("echo", "not with \"stream\": true in this version");
  }
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) return bad("stream_options", "must be an object");
    if (!r.stream) return bad("stream_options", "only with \"stream\": true");
    FERRY_ASSIGN_OR_RETURN(r.include_usage, boolean(*it, "include_usage", false));
  }
  return r;
}

std::string StopMatcher::push(std::string_view piece) {
  if (stopped_) return "";
  held_ += piece;
  // The earliest stop string in the text ends it.
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) cut = std::min(cut, held_.find(s));
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Keep back the longest tail that some stop string starts with.
  size_t keep = 0;
  for (const std::string& s : stops_)
    for (size_t n = std::min(s.size() - 1, held_.size()); n > keep; --n)
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::flush() {
  std::string out;
  out.swap(held_);
  return stopped_ ? "" : out;
}

}  // namespace ferry
