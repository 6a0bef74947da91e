// `ferry serve`: an OpenAI-compatible HTTP server over the continuous-batching Engine.
//
//   GET  /health                 {"status": "ok"}
//   GET  /metrics                counters in Prometheus' text format
//   GET  /v1/models              the one model, with its context length
//   POST /v1/completions         prompt (text or token ids) -> text; "stream": server-sent events
//   POST /v1/chat/completions    messages, through the model's chat template -> the assistant's reply
//
// HTTP requests are taken by a pool of threads (cpp-httplib); each one parses its body
// (runtime/openai.h), checks it against the engine, and hands it to the one engine thread, which
// admits it into the running batch at the next step and sends every token back as it is drawn. The
// handler decodes the tokens, applies the stop strings and answers, or streams chunks as they come.
// A stream whose client goes away, or a stop string, cancels the request: its K/V blocks go to the
// next one in the queue at once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "models/chat_template.h"
#include "models/tokenizer.h"
#include "runtime/engine.h"
#include "runtime/runner.h"

namespace ferry {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                     // 0: any free port (start() returns it)
  std::string model_id = "ferry";      // the name /v1/models reports and responses carry
  int64_t ctx = 2048;                  // prompt + completion tokens per request
  int64_t default_chat_max_tokens = 0; // chat's max_tokens when a request gives none (0: the rest of ctx)
  EngineOptions engine;
  std::optional<ChatTemplate> chat;    // none: /v1/chat/completions answers 400 saying how to give one
  int n_http_threads = 0;              // 0: 2 * batch + 4 (a handler waits while its request runs)
  std::string api_key;                 // non-empty: /v1/* and /metrics need "Authorization: Bearer <api_key>"
  // Gets one line per finished request and per failure (stderr in the CLI); may be empty.
  std::function<void(const std::string&)> log;
};

struct ServerCounters {
  int64_t requests = 0;           // taken into the engine
  int64_t refused = 0;            // answered with an error (bad request, failed step, shutdown)
  int64_t prompt_tokens = 0, generated_tokens = 0, steps = 0;
  int64_t cached_prompt_tokens = 0;  // served by the prefix cache
  int64_t live = 0, queued = 0;   // in the engine after its last step (0, 0: idle, every K/V block free)
};

class Server {
 public:
  // The runner, tokenizer and options must outlive the server.
  Server(Runner& runner, const Tokenizer& tok, ServerOptions opts);
  ~Server();

  // Binds host:port and serves on background threads; returns the port bound. Fails, naming the
  // address, when it cannot bind.
  Expected<int> start();
  // Stops taking connections, ends the requests in flight (a streamed one gets an error event),
  // and joins every thread. Safe to call twice.
  void stop();
  ServerCounters counters() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry
