#include "models/chat_template.h"

#include <filesystem>

#include <nlohmann/json.hpp>

#include "models/safetensors.h"
#include "models/tokenizer.h"

namespace ferry {

namespace {

struct FormatName {
  ChatFormat format;
  const char* name;
};
constexpr FormatName kFormats[] = {
    {ChatFormat::kChatML, "chatml"}, {ChatFormat::kQwen2, "qwen2"},     {ChatFormat::kLlama3, "llama3"},
    {ChatFormat::kLlama2, "llama2"}, {ChatFormat::kMistral, "mistral"}, {ChatFormat::kZephyr, "zephyr"},
};

bool contains(const std::string& s, std::string_view what) { return s.find(what) != std::string::npos; }

// Returns the UTF-8 length of a whitespace character (Python's str.isspace) at s[i], or 0.
size_t space_at(std::string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f)) return 1;
  auto cp_at = [&](size_t n) -> uint32_t {
    if (i + n > s.size()) return 0;
    uint32_t v = c & (n == 2 ? 0x1f : 0x0f);
    for (size_t k = 1; k < n; ++k) v = (v << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
    return v;
  };
  if ((c & 0xe0) == 0xc0) {
    const uint32_t v = cp_at(2);
    return v == 0x85 || v == 0xa0 ? 2 : 0;
  }
  if ((c & 0xf0) == 0xe0) {
    const uint32_t v = cp_at(3);
    const bool sp = v == 0x1680 || (v >= 0x2000 && v <= 0x200a) || v == 0x2028 || v == 0x2029 || v == 0x202f || v == 0x205f || v == 0x3000;
    return sp ? 3 : 0;
  }
  return 0;
}

// Python's str.strip() (Jinja's trim): Unicode whitespace off both ends.
std::string py_strip(std::string_view s) {
  size_t b = 0;
  while (b < s.size()) {
    const size_t n = space_at(s, b);
    if (n == 0) break;
    b += n;
  }
  size_t e = s.size();
  while (e > b) {
    // Step back over one UTF-8 character and test it.
    size_t p = e - 1;
    while (p > b && (static_cast<unsigned char>(s[p]) & 0xc0) == 0x80) --p;
    const size_t n = space_at(s, p);
    if (n == 0 || p + n != e) break;
    e = p;
  }
  return std::string(s.substr(b, e - b));
}

// The text of a Jinja string literal's body (escapes \n \t \\ \' \").
std::string unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out += s[i];
      continue;
    }
    const char c = s[++i];
    out += c == 'n' ? '\n' : c == 't' ? '\t' : c;
  }
  return out;
}

// Finds a constant default system message in a ChatML template: a string literal holding
// "<|im_start|>system\n" then plain text up to "<|im_end|>" (Qwen2-Instruct, Qwen2.5). Text that
// leaves the literal (a message's content spliced in) is not a default.
std::string chatml_default_system(const std::string& src) {
  for (const std::string_view head : {std::string_view("<|im_start|>system\\n"), std::string_view("<|im_start|>system\n")}) {
    for (size_t at = src.find(head); at != std::string::npos; at = src.find(head, at + 1)) {
      const size_t b = at + head.size(), e = src.find("<|im_end|>", b);
      if (e == std::string::npos) continue;
      const std::string_view body(src.data() + b, e - b);
      if (body.empty() || body.find_first_of("'\"{}") != std::string_view::npos) continue;
      return unescape(body);
    }
  }
  return "";
}

// Qwen2 base's "{% set system_message = '...' %}".
std::string set_system_message(const std::string& src) {
  const std::string key = "set system_message = ";
  const size_t at = src.find(key);
  if (at == std::string::npos || at + key.size() >= src.size()) return "";
  const char q = src[at + key.size()];
  if (q != '\'' && q != '"') return "";
  const size_t b = at + key.size() + 1;
  size_t e = b;
  while (e < src.size() && src[e] != q) e += src[e] == '\\' ? 2 : 1;
  return e < src.size() ? unescape(std::string_view(src).substr(b, e - b)) : "";
}

// A tokenizer_config.json token: a string or an AddedToken object {"content": ...}.
std::string token_text(const nlohmann::json& cfg, const char* key) {
  auto it = cfg.find(key);
  if (it == cfg.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) return (*it)["content"].get<std::string>();
  return "";
}

// Returns the tokenizer_config.json key of a token the format writes but `t` lacks, or null.
const char* missing_token(const ChatTemplate& t) {
  const ChatFormat f = t.format;
  if (t.bos_token.empty() && (f == ChatFormat::kLlama3 || f == ChatFormat::kLlama2 || f == ChatFormat::kMistral)) return "bos_token";
  if (t.eos_token.empty() && (f == ChatFormat::kLlama2 || f == ChatFormat::kMistral || f == ChatFormat::kZephyr)) return "eos_token";
  return nullptr;
}

Status alternation_error(size_t i) {
  return invalid_argument(strprintf("message %zu: conversation roles must alternate user/assistant/user/assistant/... in this chat format", i));
}

}  // namespace

std::string chat_format_names() {
  std::string s;
  for (const auto& f : kFormats) s += std::string(s.empty() ? "" : ", ") + f.name;
  return s;
}

const char* chat_format_name(ChatFormat f) {
  for (const auto& x : kFormats)
    if (x.format == f) return x.name;
  return "?";
}

Expected<ChatFormat> chat_format_from_name(const std::string& name) {
  for (const auto& x : kFormats)
    if (name == x.name) return x.format;
  return invalid_argument("--chat-template " + name + ": not a format ferry renders (" + chat_format_names() + ")");
}

Expected<ChatTemplate> ChatTemplate::detect(const std::string& src, const std::string& bos, const std::string& eos, const std::string& where) {
  ChatTemplate t;
  t.bos_token = bos;
  t.eos_token = eos;
  auto refuse = [&](const std::string& why) {
    return unsupported(where + ": " + why + "; pass --chat-template with one of " + chat_format_names() + " to use that format instead");
  };
  if (contains(src, "<|im_start|>")) {
    if (contains(src, "add_generation_prompt")) {
      t.format = ChatFormat::kChatML;
      t.default_system = chatml_default_system(src);
    } else if (contains(src, "set system_message")) {
      t.format = ChatFormat::kQwen2;
      t.default_system = set_system_message(src);
    } else {
      return refuse("a ChatML template of a form ferry does not recognise");
    }
  } else if (contains(src, "<|start_header_id|>")) {
    if (contains(src, "Cutting Knowledge Date"))
      return refuse("a Llama-3.1-style template (a dated system header ferry does not render)");
    t.format = ChatFormat::kLlama3;
  } else if (contains(src, "<|user|>") && contains(src, "<|assistant|>")) {
    t.format = ChatFormat::kZephyr;
  } else if (contains(src, "[INST]")) {
    if (contains(src, "<<SYS>>")) {
      t.format = ChatFormat::kLlama2;
    } else if (contains(src, "[AVAILABLE_TOOLS]") || contains(src, "[SYSTEM_PROMPT]")) {
      return refuse("a Mistral template with tools or a system prompt block (v0.3 and later), which ferry does not render");
    } else {
      t.format = ChatFormat::kMistral;
    }
  } else {
    return refuse("the chat template is none of the families ferry renders");
  }
  if (const char* key = missing_token(t); key)
    return invalid_argument(strprintf("%s: the %s chat format writes the %s, and tokenizer_config.json gives no %s", where.c_str(), chat_format_name(t.format), key, key));
  return t;
}

Expected<ChatTemplate> ChatTemplate::from_model_dir(const std::string& dir, const std::string& format_name) {
  namespace fs = std::filesystem;
  const std::string cfg_path = dir + "/tokenizer_config.json", jinja_path = dir + "/chat_template.jinja";
  nlohmann::json cfg = nlohmann::json::object();
  if (fs::exists(cfg_path)) {
    FERRY_ASSIGN_OR_RETURN(const std::string text, read_file_text(cfg_path));
    cfg = nlohmann::json::parse(text, nullptr, false);
    if (cfg.is_discarded() || !cfg.is_object()) return invalid_argument(cfg_path + ": not a JSON object");
  }
  std::string src, where;
  if (fs::exists(jinja_path)) {
    FERRY_ASSIGN_OR_RETURN(src, read_file_text(jinja_path));
    where = jinja_path;
  } else if (auto it = cfg.find("chat_template"); it != cfg.end()) {
    where = cfg_path + " (chat_template)";
    if (it->is_string()) {
      src = it->get<std::string>();
    } else if (it->is_array()) {  // [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
      for (const auto& e : *it)
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string()) src = e["template"].get<std::string>();
      if (src.empty()) return invalid_argument(where + ": a list of templates without one named \"default\"");
    } else {
      return invalid_argument(where + ": not a string or a list of named templates");
    }
  }
  const std::string bos = token_text(cfg, "bos_token"), eos = token_text(cfg, "eos_token");
  if (!format_name.empty()) {
    FERRY_ASSIGN_OR_RETURN(const ChatFormat f, chat_format_from_name(format_name));
    ChatTemplate t;
    t.format = f;
    t.bos_token = bos;
    t.eos_token = eos;
    if (f == ChatFormat::kChatML) t.default_system = chatml_default_system(src);
    if (f == ChatFormat::kQwen2) {
      t.default_system = set_system_message(src);
      if (t.default_system.empty()) t.default_system = "You are a helpful assistant.";
    }
    if (const char* key = missing_token(t); key)
      return invalid_argument(strprintf("--chat-template %s: the format writes the %s, and %s gives no %s", format_name.c_str(), key, cfg_path.c_str(), key));
    return t;
  }
  if (src.empty())
    return not_found(dir + ": no chat template (neither chat_template.jinja nor tokenizer_config.json's chat_template): pass --chat-template with one of " +
                     chat_format_names());
  return detect(src, bos, eos, where);
}

Expected<std::string> ChatTemplate::render(std::span<const ChatMessage> messages, bool add_generation_prompt) const {
  if (messages.empty()) return invalid_argument("the conversation has no messages");
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant")
      return invalid_argument(strprintf("message %zu: role \"%s\" is not one ferry renders (system, user, assistant)", i, r.c_str()));
    if (r == "system" && i > 0 && format != ChatFormat::kChatML && format != ChatFormat::kLlama3 && format != ChatFormat::kZephyr)
      return invalid_argument(strprintf("message %zu: the %s chat format takes a system message only first", i, chat_format_name(format)));
  }
  std::string out;
  switch (format) {
    case ChatFormat::kChatML:
      if (!default_system.empty() && messages[0].role != "system") out += "<|im_start|>system\n" + default_system + "<|im_end|>\n";
      for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      return out;
    case ChatFormat::kQwen2:  // the header of the reply follows every user turn, add_generation_prompt or not
      out += "<|im_start|>system\n" + (messages[0].role == "system" ? messages[0].content : default_system) + "<|im_end|>\n";
      for (const ChatMessage& m : messages) {
        if (m.role == "user") out += "<|im_start|>user\n" + m.content + "<|im_end|>\n<|im_start|>assistant\n";
        if (m.role == "assistant") out += m.content + "<|im_end|>\n";
      }
      return out;
    case ChatFormat::kLlama3:
      out += bos_token;
      for (const ChatMessage& m : messages) out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + py_strip(m.content) + "<|eot_id|>";
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return out;
    case ChatFormat::kZephyr:
      for (const ChatMessage& m : messages) out += "<|" + m.role + "|>\n" + m.content + eos_token + "\n";
      if (add_generation_prompt) out += "<|assistant|>\n";
      return out;
    case ChatFormat::kLlama2: {
      const bool has_sys = messages[0].role == "system";
      const size_t first = has_sys ? 1 : 0;
      if (first == messages.size()) return invalid_argument("the conversation has only a system message");
      for (size_t i = first; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if ((m.role == "user") != ((i - first) % 2 == 0)) return alternation_error(i);
        const std::string content = i == first && has_sys ? "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n" + m.content : m.content;
        if (m.role == "user")
          out += bos_token + "[INST] " + py_strip(content) + " [/INST]";
        else
          out += " " + py_strip(content) + " " + eos_token;
      }
      return out;
    }
    case ChatFormat::kMistral:
      out += bos_token;
      for (size_t i = 0; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if (m.role == "system") return invalid_argument(strprintf("message %zu: the mistral chat format has no system role", i));
        if ((m.role == "user") != (i % 2 == 0)) return alternation_error(i);
        out += m.role == "user" ? "[INST] " + m.content + " [/INST]" : m.content + eos_token;
      }
      return out;
  }
  return Status(ErrorCode::kInternal, "unknown chat format");
}

std::vector<std::string> ChatTemplate::end_of_turn() const {
  switch (format) {
    case ChatFormat::kChatML:
    case ChatFormat::kQwen2: return {"<|im_end|>"};
    case ChatFormat::kLlama3: return {"<|eot_id|>"};
    default: return {eos_token};
  }
}

std::vector<int32_t> ChatTemplate::end_of_turn_ids(const Tokenizer& tok) const {
  std::vector<int32_t> ids;
  for (const std::string& s : end_of_turn())
    if (const std::vector<int32_t> e = tok.encode(s, false); e.size() == 1) ids.push_back(e[0]);
  return ids;
}

}  // namespace ferry
