#include "models/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>
#include <unordered_map>

#include <nlohmann/json.hpp>

namespace ferry {

using json = nlohmann::json;

namespace {

const char* const kMetaSpace = "\xe2\x96\x81";  // U+2581 '▁'

// Length of the UTF-8 sequence starting with byte `c` (1 for invalid lead bytes).
size_t utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xe) return 3;
  if ((c >> 3) == 0x1e) return 4;
  return 1;
}

// Splits `s` into UTF-8 characters (an invalid or truncated sequence yields single bytes).
std::vector<std::string_view> utf8_chars(std::string_view s) {
  std::vector<std::string_view> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t n = utf8_len(static_cast<unsigned char>(s[i]));
    bool ok = i + n <= s.size();
    for (size_t k = 1; ok && k < n; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xc0) == 0x80;
    if (!ok) n = 1;
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

std::string encode_utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xc0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xe0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    s += static_cast<char>(0xf0 | (cp >> 18));
    s += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  }
  return s;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  size_t i = 0;
  while (true) {
    size_t j = s.find(from, i);
    if (j == std::string::npos) break;
    out.append(s, i, j - i);
    out.append(to);
    i = j + from.size();
  }
  out.append(s, i, std::string::npos);
  s = std::move(out);
}

// GPT-2's reversible byte <-> printable-character map.
struct ByteLevelTable {
  std::string byte_to_char[256];
  std::unordered_map<std::string, uint8_t> char_to_byte;
  ByteLevelTable() {
    std::vector<int> bs;
    for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
    for (int b = 0xa1; b <= 0xac; ++b) bs.push_back(b);
    for (int b = 0xae; b <= 0xff; ++b) bs.push_back(b);
    std::vector<int> cs = bs;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
        bs.push_back(b);
        cs.push_back(256 + n++);
      }
    }
    for (size_t i = 0; i < bs.size(); ++i) {
      byte_to_char[bs[i]] = encode_utf8(static_cast<uint32_t>(cs[i]));
      char_to_byte[byte_to_char[bs[i]]] = static_cast<uint8_t>(bs[i]);
    }
  }
};
const ByteLevelTable& byte_level() {
  static const ByteLevelTable t;
  return t;
}

const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A compiled PCRE2 pattern (UTF + Unicode properties), JIT-compiled where available.
class Regex {
 public:
  static Expected<std::shared_ptr<Regex>> compile(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK,
                                     &err, &off, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof buf);
      return unsupported(strprintf("%s: cannot compile regex at offset %zu: %s", where.c_str(), static_cast<size_t>(off), reinterpret_cast<char*>(buf)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter when JIT is unavailable
    auto r = std::shared_ptr<Regex>(new Regex());
    r->code_ = code;
    return r;
  }
  ~Regex() { pcre2_code_free(code_); }
  // Returns the [begin, end) byte ranges of all non-empty matches, left to right.
  std::vector<std::pair<size_t, size_t>> find_all(std::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t off = 0;
    // Invalid UTF-8 in the subject is an error for PCRE2: callers pass valid UTF-8 (see below).
    while (off <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), off, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) break;
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: step one character
        off = b + (b < s.size() ? utf8_len(static_cast<unsigned char>(s[b])) : 1);
        continue;
      }
      out.emplace_back(b, e);
      off = e;
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  Regex() = default;
  pcre2_code* code_ = nullptr;
};

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false, lstrip = false, rstrip = false;
};

struct NormStep {
  enum Kind { kPrepend, kReplace, kNfc, kNfkc, kLowercase } kind;
  std::string a, b;  // prepend: a; replace: a -> b
};

struct PreTokStep {
  enum Kind { kMetaspace, kSplit, kByteLevel } kind = kSplit;
  // Metaspace
  std::string replacement = kMetaSpace;
  enum { kAlways, kFirst, kNever } prepend = kAlways;
  bool split = true;
  // Split / ByteLevel regex
  std::shared_ptr<Regex> regex;
  bool removed = false;  // Split behaviour "Removed" (else "Isolated")
  bool add_prefix_space = false;
};

}  // namespace

struct Tokenizer::Impl {
  std::string path;
  std::vector<AddedToken> added;  // sorted by content length, longest first
  std::vector<NormStep> norm;
  std::vector<PreTokStep> pretok;
  // BPE
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_token;
  std::vector<bool> special;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left, right) -> (rank, merged id)
  bool byte_fallback = false, ignore_merges = false, fuse_unk = false;
  int32_t unk = -1;
  int32_t byte_ids[256];
  // Post-processor: the single-sequence template; -1 stands for the sequence.
  std::vector<int32_t> template_single{-1};
  // Decoder
  std::vector<std::pair<std::string, std::string>> dec_replace;
  bool dec_byte_fallback = false, dec_byte_level = false, dec_strip_per_token = false, dec_join_space = false;
  int dec_strip_left = 0;

  int32_t lookup(std::string_view s) const {
    auto it = vocab.find(std::string(s));
    return it == vocab.end() ? -1 : it->second;
  }

  void bpe(std::string_view piece, std::vector<int32_t>& out) const;
  void encode_segment(std::string_view text, bool first_segment, std::vector<int32_t>& out) const;
};

namespace {

Status parse_normalizer(const json& n, Tokenizer::Impl& t, const std::string& path) {
  if (n.is_null()) return Status::Ok();
  const std::string type = n.value("type", "");
  if (type == "Sequence") {
    for (const auto& s : n.value("normalizers", json::array())) FERRY_RETURN_IF_ERROR(parse_normalizer(s, t, path));
  } else if (type == "Prepend") {
    t.norm.push_back({NormStep::kPrepend, n.value("prepend", ""), ""});
  } else if (type == "Replace") {
    const json& p = n.value("pattern", json::object());
    if (!p.contains("String")) return unsupported(strprintf("%s: normalizer Replace with a regex pattern is not supported", path.c_str()));
    t.norm.push_back({NormStep::kReplace, p["String"].get<std::string>(), n.value("content", "")});
  } else if (type == "NFC") {
    t.norm.push_back({NormStep::kNfc, "", ""});
  } else if (type == "NFKC") {
    t.norm.push_back({NormStep::kNfkc, "", ""});
  } else if (type == "Lowercase") {
    t.norm.push_back({NormStep::kLowercase, "", ""});
  } else {
    return unsupported(strprintf("%s: normalizer type '%s' is not supported", path.c_str(), type.c_str()));
  }
  return Status::Ok();
}

Status parse_pretokenizer(const json& p, Tokenizer::Impl& t, const std::string& path) {
  if (p.is_null()) return Status::Ok();
  const std::string type = p.value("type", "");
  if (type == "Sequence") {
    for (const auto& s : p.value("pretokenizers", json::array())) FERRY_RETURN_IF_ERROR(parse_pretokenizer(s, t, path));
  } else if (type == "Metaspace") {
    PreTokStep s;
    s.kind = PreTokStep::kMetaspace;
    s.replacement = p.value("replacement", std::string(kMetaSpace));
    const std::string scheme = p.value("prepend_scheme", p.value("add_prefix_space", true) ? "always" : "never");
    s.prepend = scheme == "first" ? PreTokStep::kFirst : scheme == "never" ? PreTokStep::kNever : PreTokStep::kAlways;
    s.split = p.value("split", true);
    t.pretok.push_back(std::move(s));
  } else if (type == "Split") {
    PreTokStep s;
    s.kind = PreTokStep::kSplit;
    const json& pat = p.value("pattern", json::object());
    std::string re;
    if (pat.contains("Regex")) re = pat["Regex"].get<std::string>();
    else if (pat.contains("String")) {
      for (char c : pat["String"].get<std::string>()) {  // a literal string, escaped
        if (std::strchr("\\^$.|?*+()[]{}", c)) re += '\\';
        re += c;
      }
    } else return corrupt(strprintf("%s: Split pre-tokenizer without a pattern", path.c_str()));
    const std::string behavior = p.value("behavior", "Isolated");
    if (behavior != "Isolated" && behavior != "Removed")
      return unsupported(strprintf("%s: Split behavior '%s' is not supported (Isolated, Removed)", path.c_str(), behavior.c_str()));
    if (p.value("invert", false)) return unsupported(strprintf("%s: Split with invert is not supported", path.c_str()));
    s.removed = behavior == "Removed";
    FERRY_ASSIGN_OR_RETURN(s.regex, Regex::compile(re, path + ": Split pattern"));
    t.pretok.push_back(std::move(s));
  } else if (type == "ByteLevel") {
    PreTokStep s;
    s.kind = PreTokStep::kByteLevel;
    s.add_prefix_space = p.value("add_prefix_space", false);
    if (p.value("use_regex", true)) {
      FERRY_ASSIGN_OR_RETURN(s.regex, Regex::compile(kGpt2Pattern, path + ": ByteLevel"));
    }
    t.pretok.push_back(std::move(s));
  } else {
    return unsupported(strprintf("%s: pre_tokenizer type '%s' is not supported", path.c_str(), type.c_str()));
  }
  return Status::Ok();
}

Status parse_decoder(const json& d, Tokenizer::Impl& t, bool* fused, const std::string& path) {
  if (d.is_null()) return Status::Ok();
  const std::string type = d.value("type", "");
  if (type == "Sequence") {
    for (const auto& s : d.value("decoders", json::array())) FERRY_RETURN_IF_ERROR(parse_decoder(s, t, fused, path));
  } else if (type == "Replace") {
    const json& p = d.value("pattern", json::object());
    if (!p.contains("String")) return unsupported(strprintf("%s: decoder Replace with a regex is not supported", path.c_str()));
    t.dec_replace.emplace_back(p["String"].get<std::string>(), d.value("content", ""));
  } else if (type == "ByteFallback") {
    t.dec_byte_fallback = true;
  } else if (type == "Fuse") {
    *fused = true;
  } else if (type == "Strip") {
    if (d.value("content", " ") != " " || d.value("stop", 0) != 0)
      return unsupported(strprintf("%s: decoder Strip other than leading spaces is not supported", path.c_str()));
    t.dec_strip_left = d.value("start", 0);
    t.dec_strip_per_token = !*fused;
  } else if (type == "Metaspace") {
    t.dec_replace.emplace_back(d.value("replacement", std::string(kMetaSpace)), " ");
    const std::string scheme = d.value("prepend_scheme", d.value("add_prefix_space", true) ? "always" : "never");
    if (scheme != "never") t.dec_strip_left = 1;
  } else if (type == "ByteLevel") {
    t.dec_byte_level = true;
  } else {
    return unsupported(strprintf("%s: decoder type '%s' is not supported", path.c_str(), type.c_str()));
  }
  return Status::Ok();
}

Status parse_post(const json& p, Tokenizer::Impl& t, const std::string& path) {
  if (p.is_null()) return Status::Ok();
  const std::string type = p.value("type", "");
  if (type == "Sequence") {
    for (const auto& s : p.value("processors", json::array())) FERRY_RETURN_IF_ERROR(parse_post(s, t, path));
  } else if (type == "ByteLevel") {
    // Offsets only.
  } else if (type == "TemplateProcessing") {
    t.template_single.clear();
    const json& specials = p.value("special_tokens", json::object());
    for (const auto& item : p.value("single", json::array())) {
      if (item.contains("Sequence")) {
        t.template_single.push_back(-1);
      } else if (item.contains("SpecialToken")) {
        const std::string name = item["SpecialToken"].value("id", "");
        if (!specials.contains(name)) return corrupt(strprintf("%s: post_processor names special token '%s' without defining it", path.c_str(), name.c_str()));
        for (const auto& id : specials[name].value("ids", json::array())) t.template_single.push_back(id.get<int32_t>());
      }
    }
  } else {
    return unsupported(strprintf("%s: post_processor type '%s' is not supported", path.c_str(), type.c_str()));
  }
  return Status::Ok();
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Expected<std::unique_ptr<Tokenizer>> Tokenizer::from_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return not_found(strprintf("%s: cannot open tokenizer file", path.c_str()));
  std::stringstream ss;
  ss << f.rdbuf();
  return from_json(ss.str(), path);
}

Expected<std::unique_ptr<Tokenizer>> Tokenizer::from_json(const std::string& text, const std::string& path) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return corrupt(strprintf("%s: not a valid JSON object", path.c_str()));
  auto t = std::make_unique<Impl>();
  t->path = path;
  const json& model = j.value("model", json());
  if (!model.is_object()) return corrupt(strprintf("%s: missing 'model'", path.c_str()));
  const std::string mtype = model.value("type", "BPE");
  if (mtype != "BPE") return unsupported(strprintf("%s: tokenizer model '%s' is not supported (only BPE)", path.c_str(), mtype.c_str()));
  if (!model.contains("vocab") || !model["vocab"].is_object()) return corrupt(strprintf("%s: model.vocab must be an object", path.c_str()));
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(k) && model[k].is_string() && !model[k].get<std::string>().empty())
      return unsupported(strprintf("%s: BPE '%s' is not supported", path.c_str(), k));
  int32_t max_id = -1;
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > (1 << 30))
      return corrupt(strprintf("%s: vocab entry '%s' has an invalid id", path.c_str(), it.key().c_str()));
    const int32_t id = it.value().get<int32_t>();
    t->vocab[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  const json& added = j.value("added_tokens", json::array());
  for (const auto& a : added) {
    if (!a.is_object() || !a.contains("id") || !a.contains("content") || !a["id"].is_number_integer() || !a["content"].is_string())
      return corrupt(strprintf("%s: an added_tokens entry lacks 'id' or 'content'", path.c_str()));
    AddedToken tok{a["content"], a["id"].get<int32_t>(), a.value("special", false), a.value("lstrip", false), a.value("rstrip", false)};
    if (tok.id < 0 || tok.content.empty()) return corrupt(strprintf("%s: added token '%s' is invalid", path.c_str(), tok.content.c_str()));
    max_id = std::max(max_id, tok.id);
    t->added.push_back(std::move(tok));
  }
  std::stable_sort(t->added.begin(), t->added.end(), [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  t->id_to_token.assign(max_id + 1, "");
  t->special.assign(max_id + 1, false);
  for (const auto& [s, id] : t->vocab) t->id_to_token[id] = s;
  for (const auto& a : t->added) {
    t->id_to_token[a.id] = a.content;
    t->special[a.id] = a.special;
  }
  // Merges: either "a b" strings or ["a", "b"] pairs.
  int32_t rank = 0;
  for (const auto& m : model.value("merges", json::array())) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m;
      const size_t sp = s.find(' ', 1);
      if (sp == std::string::npos) return corrupt(strprintf("%s: merge '%s' is not 'left right'", path.c_str(), s.c_str()));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0];
      b = m[1];
    } else {
      return corrupt(strprintf("%s: merge #%d is malformed", path.c_str(), rank));
    }
    const int32_t ia = t->lookup(a), ib = t->lookup(b), im = t->lookup(a + b);
    if (ia < 0 || ib < 0 || im < 0) return corrupt(strprintf("%s: merge #%d ('%s' '%s') uses tokens missing from the vocabulary", path.c_str(), rank, a.c_str(), b.c_str()));
    const uint64_t key = (static_cast<uint64_t>(ia) << 32) | static_cast<uint32_t>(ib);
    t->merges.emplace(key, std::make_pair(rank, im));  // the first (lowest-rank) entry wins
    ++rank;
  }
  t->byte_fallback = model.value("byte_fallback", false);
  t->ignore_merges = model.value("ignore_merges", false);
  t->fuse_unk = model.value("fuse_unk", false);
  if (model.contains("unk_token") && model["unk_token"].is_string()) t->unk = t->lookup(model["unk_token"].get<std::string>());
  for (int b = 0; b < 256; ++b) t->byte_ids[b] = t->lookup(strprintf("<0x%02X>", b));

  FERRY_RETURN_IF_ERROR(parse_normalizer(j.value("normalizer", json()), *t, path));
  FERRY_RETURN_IF_ERROR(parse_pretokenizer(j.value("pre_tokenizer", json()), *t, path));
  FERRY_RETURN_IF_ERROR(parse_post(j.value("post_processor", json()), *t, path));
  bool fused = false;
  const json& dec = j.value("decoder", json());
  if (dec.is_null()) t->dec_join_space = false;
  FERRY_RETURN_IF_ERROR(parse_decoder(dec, *t, &fused, path));
  for (int32_t id : t->template_single)
    if (id >= static_cast<int32_t>(t->id_to_token.size())) return corrupt(strprintf("%s: post_processor uses id %d outside the vocabulary", path.c_str(), id));
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(t)));
}

void Tokenizer::Impl::bpe(std::string_view piece, std::vector<int32_t>& out) const {
  if (piece.empty()) return;
  if (ignore_merges) {
    if (int32_t id = lookup(piece); id >= 0) {
      out.push_back(id);
      return;
    }
  }
  struct Sym {
    int32_t id;
    int32_t prev, next;
    bool live;
  };
  std::vector<Sym> syms;
  for (std::string_view c : utf8_chars(piece)) {
    if (int32_t id = lookup(c); id >= 0) {
      syms.push_back({id, 0, 0, true});
      continue;
    }
    if (byte_fallback) {
      bool all = true;
      for (unsigned char b : c) all &= byte_ids[b] >= 0;
      if (all) {
        for (unsigned char b : c) syms.push_back({byte_ids[b], 0, 0, true});
        continue;
      }
    }
    if (unk >= 0) {
      if (fuse_unk && !syms.empty() && syms.back().id == unk) continue;
      syms.push_back({unk, 0, 0, true});
    }
  }
  const int32_t n = static_cast<int32_t>(syms.size());
  for (int32_t i = 0; i < n; ++i) {
    syms[i].prev = i - 1;
    syms[i].next = i + 1 < n ? i + 1 : -1;
  }
  struct Cand {
    int32_t rank, pos, new_id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> q;
  auto pair_of = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges.find((static_cast<uint64_t>(syms[a].id) << 32) | static_cast<uint32_t>(syms[b].id));
    return it == merges.end() ? nullptr : &it->second;
  };
  for (int32_t i = 0; i + 1 < n; ++i)
    if (auto* m = pair_of(i, i + 1)) q.push({m->first, i, m->second});
  while (!q.empty()) {
    Cand c = q.top();
    q.pop();
    Sym& left = syms[c.pos];
    if (!left.live || left.next < 0) continue;
    const int32_t r = left.next;
    auto* m = pair_of(c.pos, r);
    if (m == nullptr || m->second != c.new_id) continue;
    left.id = c.new_id;
    syms[r].live = false;
    left.next = syms[r].next;
    if (left.next >= 0) syms[left.next].prev = c.pos;
    if (left.prev >= 0)
      if (auto* pm = pair_of(left.prev, c.pos)) q.push({pm->first, left.prev, pm->second});
    if (left.next >= 0)
      if (auto* nm = pair_of(c.pos, left.next)) q.push({nm->first, c.pos, nm->second});
  }
  for (int32_t i = 0; i < n; ++i)
    if (syms[i].live) out.push_back(syms[i].id);
}

void Tokenizer::Impl::encode_segment(std::string_view text, bool first_segment, std::vector<int32_t>& out) const {
  std::string s(text);
  for (const auto& st : norm) {
    switch (st.kind) {
      case NormStep::kPrepend:
        if (!s.empty()) s = st.a + s;
        break;
      case NormStep::kReplace: replace_all(s, st.a, st.b); break;
      case NormStep::kNfc:
      case NormStep::kNfkc:
      case NormStep::kLowercase: {
        int opts = UTF8PROC_STABLE | (st.kind == NormStep::kNfc ? UTF8PROC_COMPOSE
                                      : st.kind == NormStep::kNfkc ? (UTF8PROC_COMPOSE | UTF8PROC_COMPAT) : UTF8PROC_CASEFOLD);
        utf8proc_uint8_t* dst = nullptr;
        utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), static_cast<utf8proc_ssize_t>(s.size()), &dst,
                                          static_cast<utf8proc_option_t>(opts));
        if (n >= 0) s.assign(reinterpret_cast<char*>(dst), static_cast<size_t>(n));  // invalid UTF-8 is left as it is
        std::free(dst);
        break;
      }
    }
  }
  // Pre-tokenize: a list of pieces, refined by each step.
  std::vector<std::string> pieces{std::move(s)};
  for (const auto& st : pretok) {
    std::vector<std::string> next;
    for (std::string& p : pieces) {
      if (st.kind == PreTokStep::kMetaspace) {
        replace_all(p, " ", st.replacement);
        const bool prepend = st.prepend == PreTokStep::kAlways || (st.prepend == PreTokStep::kFirst && first_segment);
        if (prepend && !p.empty() && p.rfind(st.replacement, 0) != 0) p = st.replacement + p;
        if (!st.split) {
          next.push_back(std::move(p));
          continue;
        }
        size_t start = 0;  // split before each replacement character (MergedWithNext)
        for (size_t i = st.replacement.size(); i <= p.size(); ++i) {
          if (i == p.size() || p.compare(i, st.replacement.size(), st.replacement) == 0) {
            if (i > start) next.push_back(p.substr(start, i - start));
            start = i;
            if (i == p.size()) break;
          }
        }
      } else {
        std::string work = p;
        if (st.kind == PreTokStep::kByteLevel && st.add_prefix_space && !work.empty() && work[0] != ' ') work = " " + work;
        std::vector<std::string> parts;
        if (st.regex) {
          // PCRE2 requires valid UTF-8; byte-level text may carry invalid bytes, matched as U+FFFD.
          if (utf8_lossy(work) != work) {
            parts.push_back(work);
          } else {
            // Isolated: gaps and matches are pieces; Removed: matches are dropped.
            size_t last = 0;
            for (auto [b, e] : st.regex->find_all(work)) {
              if (b > last) parts.push_back(work.substr(last, b - last));
              if (!st.removed) parts.push_back(work.substr(b, e - b));
              last = e;
            }
            if (last < work.size()) parts.push_back(work.substr(last));
          }
        } else {
          parts.push_back(work);
        }
        for (auto& part : parts) {
          if (st.kind == PreTokStep::kByteLevel) {
            std::string mapped;
            for (unsigned char c : part) mapped += byte_level().byte_to_char[c];
            next.push_back(std::move(mapped));
          } else {
            next.push_back(std::move(part));
          }
        }
      }
    }
    pieces = std::move(next);
  }
  for (const auto& p : pieces) bpe(p, out);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  const Impl& t = *impl_;
  std::vector<int32_t> ids;
  // Split on added tokens (leftmost, then longest), honouring lstrip / rstrip.
  size_t seg_start = 0, i = 0;
  bool first = true;
  auto is_ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (i < text.size()) {
    const AddedToken* hit = nullptr;
    for (const auto& a : t.added) {
      if (text.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    size_t seg_end = i;
    if (hit->lstrip)
      while (seg_end > seg_start && is_ws(text[seg_end - 1])) --seg_end;
    if (seg_end > seg_start) {
      t.encode_segment(text.substr(seg_start, seg_end - seg_start), first, ids);
    }
    first = false;
    ids.push_back(hit->id);
    i += hit->content.size();
    if (hit->rstrip)
      while (i < text.size() && is_ws(text[i])) ++i;
    seg_start = i;
  }
  if (seg_start < text.size()) t.encode_segment(text.substr(seg_start), first, ids);
  if (!add_special) return ids;
  std::vector<int32_t> out;
  for (int32_t x : t.template_single) {
    if (x < 0) out.insert(out.end(), ids.begin(), ids.end());
    else out.push_back(x);
  }
  return out;
}

int64_t Tokenizer::n_vocab() const { return static_cast<int64_t>(impl_->id_to_token.size()); }

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < static_cast<int32_t>(impl_->special.size()) && impl_->special[id];
}

std::string_view Tokenizer::token_string(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(impl_->id_to_token.size())) return {};
  return impl_->id_to_token[id];
}

int Tokenizer::strip_leading_spaces() const { return impl_->dec_strip_per_token ? 0 : impl_->dec_strip_left; }

std::string Tokenizer::token_bytes(int32_t id) const {
  const Impl& t = *impl_;
  std::string s(token_string(id));
  if (t.dec_byte_level) {
    std::string out;
    for (std::string_view c : utf8_chars(s)) {
      auto it = byte_level().char_to_byte.find(std::string(c));
      if (it == byte_level().char_to_byte.end()) return s;  // not byte-level text: the token's own bytes
      out += static_cast<char>(it->second);
    }
    return out;
  }
  if (t.dec_byte_fallback && s.size() == 6 && s.compare(0, 3, "<0x") == 0 && s[5] == '>') {
    unsigned v = 0;
    if (std::sscanf(s.c_str() + 3, "%2X", &v) == 1) return std::string(1, static_cast<char>(v));
  }
  for (const auto& [from, to] : t.dec_replace) replace_all(s, from, to);
  if (t.dec_strip_per_token) {
    int n = t.dec_strip_left;
    size_t k = 0;
    while (n-- > 0 && k < s.size() && s[k] == ' ') ++k;
    s.erase(0, k);
  }
  return s;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  StreamDecoder d(*this, skip_special);
  std::string out;
  for (int32_t id : ids) out += d.push(id);
  out += d.flush();
  return out;
}

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    uint32_t cp = 0;
    if (c < 0x80) { out += static_cast<char>(c); ++i; continue; }
    if ((c >> 5) == 0x6) { n = 2; cp = c & 0x1f; }
    else if ((c >> 4) == 0xe) { n = 3; cp = c & 0x0f; }
    else if ((c >> 3) == 0x1e) { n = 4; cp = c & 0x07; }
    size_t k = 1;
    for (; n && k < n && i + k < s.size() && (static_cast<unsigned char>(s[i + k]) & 0xc0) == 0x80; ++k) cp = (cp << 6) | (s[i + k] & 0x3f);
    const bool ok = n && k == n && !(n == 2 && cp < 0x80) && !(n == 3 && cp < 0x800) && !(n == 4 && (cp < 0x10000 || cp > 0x10ffff)) &&
                    !(cp >= 0xd800 && cp <= 0xdfff);
    if (ok) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      out += "\xef\xbf\xbd";
      i += std::max<size_t>(1, k);
    }
  }
  return out;
}

size_t utf8_complete_prefix(std::string_view s) {
  // Look back at most 3 bytes for a lead byte whose sequence is not complete yet.
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const unsigned char c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xc0) == 0x80) continue;  // continuation byte: keep looking
    const size_t need = utf8_len(c);
    if (need > back && c >= 0xc0) return n - back;
    return n;
  }
  return n;
}

void StreamDecoder::prime(std::span<const int32_t> ids) {
  for (int32_t id : ids) push(id);
}

std::string StreamDecoder::push(int32_t id) {
  if (skip_special_ && tok_.is_special(id)) return {};
  std::string b = tok_.token_bytes(id);
  size_t k = 0;
  while (strip_left_ > 0 && k < b.size() && b[k] == ' ') {
    ++k;
    --strip_left_;
  }
  if (k < b.size()) strip_left_ = 0;  // only the very start of the text is stripped
  pending_.append(b, k, std::string::npos);
  const size_t cut = utf8_complete_prefix(pending_);
  std::string out = utf8_lossy(std::string_view(pending_).substr(0, cut));
  pending_.erase(0, cut);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = utf8_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace ferry
