// The OpenAI API's request side, for `ferry serve` (runtime/server.h): a /v1/completions or
// /v1/chat/completions body checked and turned into token ids and sampling parameters, and stop
// strings matched against streamed text. What ferry cannot honour (n > 1, echo while streaming,
// tools, penalties, logit_bias, suffix, a JSON response_format) is refused with the parameter
// named, never ignored.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "models/chat_template.h"
#include "models/config.h"
#include "models/tokenizer.h"
#include "runtime/sampler.h"
#include "runtime/status.h"

namespace ferry {

struct CompletionRequest {
  bool chat = false;
  std::vector<int32_t> prompt;       // ids, the chat template applied
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<std::string> stop;     // stop strings: the text ends before the first one
  bool ignore_eos = false;           // (vLLM's extension) run to max_tokens
  bool stream = false;
  bool include_usage = false;        // stream_options.include_usage: a last chunk with the counts
  int64_t logprobs = -1;             // >= 0: each token's log-probability and this many alternatives
  bool echo = false;                 // completions: the prompt's text before the completion (and with
                                     // logprobs, its tokens' log-probabilities too)
  std::string prompt_text;           // the prompt as text: as given, or decoded from its ids
};

struct CompletionLimits {
  int64_t ctx = 0;                   // prompt + completion tokens a request may have
  int64_t default_chat_max_tokens = 0;  // > 0: chat's max_tokens when the body gives none; else ctx - prompt
  uint64_t default_seed = 0;         // the seed when the body gives none
};

// Parses a request body. `chat` picks the endpoint; a chat request needs `tmpl` (null: the model
// has no chat template, and the error says how to give one). Errors are kInvalidArgument (HTTP 400)
// and name the parameter.
Expected<CompletionRequest> parse_completion_request(const nlohmann::json& body, bool chat, const Tokenizer& tok, const ChatTemplate* tmpl,
                                                     const ModelConfig& cfg, const CompletionLimits& limits);

// Holds back streamed text that could be the start of a stop string, and ends the text at the first
// stop string that appears (the stop string itself is not part of the text, as in OpenAI's API).
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Adds `piece`; returns the text that is now certain to be part of the output.
  std::string push(std::string_view piece);
  // Returns the text held back, at the end of the stream (nothing once stopped).
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace ferry
