// Tokenizer: Hugging Face tokenizer.json, the subset Llama/Mistral/Qwen2/GPT-2 families use.
//
//   added tokens (matched literally, longest first)  ->  normalizer (Prepend, Replace, NFC, ...)
//   -> pre-tokenizer (Metaspace, Split with a Unicode regex, ByteLevel)  ->  BPE (merge ranks,
//   byte fallback, ignore_merges)  ->  post-processor (TemplateProcessing: BOS)
//
// Decoding maps each token to bytes (SentencePiece "▁" and <0xXX> tokens, or the ByteLevel byte
// alphabet) and assembles UTF-8; StreamDecoder does it one token at a time without ever emitting
// half a character.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/status.h"

namespace ferry {

class Tokenizer {
 public:
  ~Tokenizer();
  // Reads a tokenizer.json file.
  static Expected<std::unique_ptr<Tokenizer>> from_file(const std::string& path);
  // Parses tokenizer.json text; `path` is only used in messages.
  static Expected<std::unique_ptr<Tokenizer>> from_json(const std::string& text, const std::string& path);

  // Encodes `text`. With `add_special`, the post-processor's template adds BOS where the file says.
  std::vector<int32_t> encode(std::string_view text, bool add_special) const;
  // Decodes ids to text; special tokens are kept unless `skip_special`.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  // Returns the number of ids (vocabulary plus added tokens): one more than the largest id.
  int64_t n_vocab() const;
  bool is_special(int32_t id) const;
  // Returns the token's string as stored in the file, or "" for an unknown id.
  std::string_view token_string(int32_t id) const;
  // Returns the bytes token `id` contributes to decoded text, before leading-space stripping.
  std::string token_bytes(int32_t id) const;
  // Returns how many leading spaces the decoder strips from the start of a text (Strip / Metaspace).
  int strip_leading_spaces() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Decodes a stream of ids incrementally: push() returns the text each id completes.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true) : tok_(tok), skip_special_(skip_special) {
    strip_left_ = tok.strip_leading_spaces();
  }
  // Feeds context (the prompt) without returning its text, so the continuation decodes as it
  // would inside the whole sequence.
  void prime(std::span<const int32_t> ids);
  // Returns the complete UTF-8 characters that `id` finishes (possibly empty).
  std::string push(int32_t id);
  // Returns what is left (an incomplete character becomes U+FFFD).
  std::string flush();

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  int strip_left_ = 0;
  std::string pending_;
};

// Returns `bytes` as valid UTF-8: each invalid sequence becomes U+FFFD (like from_utf8_lossy).
std::string utf8_lossy(std::string_view bytes);
// Returns the length of the longest prefix of `s` that does not end inside a (possibly valid)
// incomplete UTF-8 sequence.
size_t utf8_complete_prefix(std::string_view s);

}  // namespace ferry
