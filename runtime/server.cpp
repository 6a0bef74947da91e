#include "runtime/server.h"

#include <sys/socket.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "runtime/openai.h"

namespace ferry {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// One request between its HTTP handler and the engine thread.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<EngineEvent> events;  // drawn tokens not yet taken by the handler
  bool done = false;               // the engine is finished with it (events may still be queued)
  std::string error;               // set with done when it failed
  std::atomic<bool> cancel{false}; // set by the handler: a stop string, or the client went away
  EngineRequest req;               // moved into the engine at submission
  Clock::time_point t_submit;

  void push(const EngineEvent& e) {
    std::lock_guard lk(mu);
    events.push_back(e);
    if (e.finish != FinishReason::kNone) done = true;
    cv.notify_all();
  }
  void fail(const std::string& why) {
    std::lock_guard lk(mu);
    if (done) return;
    error = why;
    done = true;
    cv.notify_all();
  }
  // Moves the tokens drawn so far into `out`, waiting for at least one or the end. Returns false
  // once nothing more will come.
  bool take(std::vector<EngineEvent>& out) {
    std::unique_lock lk(mu);
    cv.wait(lk, [&] { return !events.empty() || done; });
    out.assign(events.begin(), events.end());
    events.clear();
    return !out.empty() || !done;
  }
};

int http_status(const Status& st) {
  switch (st.code()) {
    case ErrorCode::kInvalidArgument:
    case ErrorCode::kUnsupported: return 400;
    case ErrorCode::kNotFound: return 404;
    default: return 500;
  }
}

json error_body(const std::string& message, int status) {
  return json{{"error", {{"message", message}, {"type", status < 500 ? "invalid_request_error" : "server_error"}, {"param", nullptr}, {"code", nullptr}}}};
}

const char* openai_finish(FinishReason r) { return r == FinishReason::kLength ? "length" : "stop"; }

}  // namespace

struct Server::Impl {
  Runner& runner;
  const Tokenizer& tok;
  ServerOptions opts;
  Engine engine;
  httplib::Server http;
  std::thread listen_thread, engine_thread;

  std::mutex mu;  // guards inbox, stopping, counters
  std::condition_variable cv;
  std::vector<std::shared_ptr<Channel>> inbox;
  bool stopping = false, started = false;
  ServerCounters counts;
  std::atomic<uint64_t> next_seq{0};
  std::vector<int32_t> chat_stop_ids;  // the chat format's end-of-turn tokens
  int64_t created = static_cast<int64_t>(std::time(nullptr));

  Impl(Runner& r, const Tokenizer& t, ServerOptions o) : runner(r), tok(t), opts(std::move(o)), engine(r, opts.engine) {
    if (opts.chat) chat_stop_ids = opts.chat->end_of_turn_ids(tok);
  }

  void log(const std::string& line) {
    if (opts.log) opts.log(line);
  }

  // Hands a checked request to the engine thread; false when the server is stopping.
  bool enqueue(const std::shared_ptr<Channel>& ch) {
    std::lock_guard lk(mu);
    if (stopping) return false;
    ch->t_submit = Clock::now();
    inbox.push_back(ch);
    cv.notify_all();
    return true;
  }

  void engine_loop() {
    std::unordered_map<int64_t, std::shared_ptr<Channel>> live;
    std::vector<EngineEvent> events;
    for (;;) {
      std::vector<std::shared_ptr<Channel>> incoming;
      {
        std::unique_lock lk(mu);
        // Idle: sleep until a request comes. Busy: only pick up what came.
        cv.wait(lk, [&] { return stopping || !inbox.empty() || !engine.idle(); });
        if (stopping) {
          for (auto& ch : inbox) ch->fail("the server is shutting down");
          inbox.clear();
          break;
        }
        incoming.swap(inbox);
      }
      for (auto& ch : incoming) {
        auto id = engine.submit(std::move(ch->req));
        if (!id.ok()) {
          ch->fail(id.status().message());
          continue;
        }
        live[*id] = ch;
      }
      for (auto& [id, ch] : live)
        if (ch->cancel.load()) engine.cancel(id);
      if (engine.idle()) {
        std::lock_guard lk(mu);
        counts.live = counts.queued = 0;
        continue;
      }
      Status st = engine.step(events);
      if (!st.ok()) {
        log("ferry: serve: a step failed, ending the " + std::to_string(live.size()) + " requests in flight: " + st.message());
        for (auto& [id, ch] : live) ch->fail(st.message());
        live.clear();
        continue;
      }
      {
        std::lock_guard lk(mu);
        counts.steps = engine.stats().steps;
        counts.generated_tokens = engine.stats().generated_tokens;
        counts.cached_prompt_tokens = engine.stats().cached_prompt_tokens;
        counts.live = engine.n_live();
        counts.queued = engine.n_queued();
      }
      for (const EngineEvent& e : events) {
        auto it = live.find(e.id);
        if (it == live.end()) continue;
        it->second->push(e);
        if (e.finish != FinishReason::kNone) live.erase(it);
      }
    }
    for (auto& [id, ch] : live) ch->fail("the server is shutting down");
  }

  void reply_error(httplib::Response& res, const Status& st) {
    const int status = http_status(st);
    res.status = status;
    res.set_content(error_body(st.message(), status).dump(), "application/json");
    std::lock_guard lk(mu);
    ++counts.refused;
  }

  // Turns drawn tokens into text: decoded incrementally (special tokens left out), cut at a stop
  // string.
  struct TextState {
    const Tokenizer& tok;
    StreamDecoder dec;
    StopMatcher stop;
    int64_t n_generated = 0;
    int64_t cached = 0;  // prompt tokens the prefix cache served
    FinishReason finish = FinishReason::kNone;
    // Log-probabilities not yet sent, and where each token's text starts in the decoded output.
    std::vector<EngineEvent> logprobs;
    std::vector<int64_t> offsets;
    int64_t decoded = 0;
    // Echo: the prompt's tokens, decoded apart for their offsets; the completion's offsets start
    // after the prompt's text.
    StreamDecoder prompt_dec;
    int64_t prompt_decoded = 0, base = 0;
    TextState(const Tokenizer& t, const std::vector<int32_t>& prompt, std::vector<std::string> stops) : tok(t), dec(t, true), stop(std::move(stops)), prompt_dec(t, true) {
      dec.prime(prompt);
    }
    // Starts an echo: the first prompt token (no log-probability: nothing comes before it).
    void echo(int32_t first, int64_t prompt_text_bytes) {
      EngineEvent e;
      e.token = first;
      add_prompt(e);
      base = prompt_text_bytes;
    }
    void add_prompt(const EngineEvent& e) {
      logprobs.push_back(e);
      offsets.push_back(prompt_decoded);
      prompt_decoded += static_cast<int64_t>(prompt_dec.push(e.token).size());
    }
    // OpenAI's logprobs object for the entries gathered since the last call (then forgotten):
    // completions' {tokens, token_logprobs, top_logprobs, text_offset}, or chat's {content: [...]}.
    json take_logprobs(bool chat) {
      auto text_of = [&](int32_t id) { return utf8_lossy(tok.token_bytes(id)); };
      auto bytes_of = [&](int32_t id) {
        json b = json::array();
        for (unsigned char c : tok.token_bytes(id)) b.push_back(static_cast<int>(c));
        return b;
      };
      json out;
      if (chat) {
        json content = json::array();
        for (const EngineEvent& e : logprobs) {
          json top = json::array();
          for (const auto& [id, lp] : e.top) top.push_back({{"token", text_of(id)}, {"logprob", lp}, {"bytes", bytes_of(id)}});
          content.push_back({{"token", text_of(e.token)}, {"logprob", e.logprob}, {"bytes", bytes_of(e.token)}, {"top_logprobs", top}});
        }
        out = {{"content", content}};
      } else {
        json tokens = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
        for (size_t i = 0; i < logprobs.size(); ++i) {
          const EngineEvent& e = logprobs[i];
          tokens.push_back(text_of(e.token));
          if (!e.has_logprob) {  // an echo's first token
            lps.push_back(nullptr);
            tops.push_back(nullptr);
          } else {
            lps.push_back(e.logprob);
            json top = json::object();
            for (const auto& [id, lp] : e.top) top[text_of(id)] = lp;
            tops.push_back(top);
          }
          offs.push_back(offsets[i]);
        }
        out = {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
      }
      logprobs.clear();
      offsets.clear();
      return out;
    }
    // Returns the text the events add; sets `finish` when the output ended.
    std::string add(const std::vector<EngineEvent>& events) {
      std::string out;
      for (const EngineEvent& e : events) {
        if (finish != FinishReason::kNone || e.token < 0) break;
        if (e.prompt) {
          add_prompt(e);
          continue;
        }
        ++n_generated;
        cached = e.cached_tokens;
        if (e.has_logprob) {
          logprobs.push_back(e);
          offsets.push_back(base + decoded);
        }
        const std::string piece = dec.push(e.token);
        decoded += static_cast<int64_t>(piece.size());
        out += stop.push(piece);
        if (stop.stopped()) {
          finish = FinishReason::kStopId;
          break;
        }
        if (e.finish != FinishReason::kNone) {
          finish = e.finish;
          out += stop.push(dec.flush());
          out += stop.flush();
        }
      }
      return out;
    }
  };

  void handle_completion(const httplib::Request& req, httplib::Response& res, bool chat) {
    const json body = json::parse(req.body, nullptr, false);
    if (body.is_discarded()) return reply_error(res, invalid_argument("the request body is not valid JSON"));
    const ModelConfig& cfg = runner.config();
    CompletionLimits limits{opts.ctx, opts.default_chat_max_tokens, 0x5eed0000ull + next_seq.load()};
    auto cr = parse_completion_request(body, chat, tok, opts.chat ? &*opts.chat : nullptr, cfg, limits);
    if (!cr.ok()) return reply_error(res, cr.status());
    auto ch = std::make_shared<Channel>();
    ch->req.prompt = cr->prompt;
    ch->req.max_tokens = cr->max_tokens;
    ch->req.sampling = cr->sampling;
    ch->req.stop_at_eos = !cr->ignore_eos;
    ch->req.logprobs = cr->logprobs;
    ch->req.prompt_logprobs = cr->echo && cr->logprobs >= 0;
    if (chat && !cr->ignore_eos) ch->req.stop_ids = chat_stop_ids;
    if (Status st = engine.validate(ch->req); !st.ok()) return reply_error(res, st);
    const uint64_t seq = next_seq.fetch_add(1);
    const std::string id = strprintf("%s-%llx%04llx", chat ? "chatcmpl" : "cmpl", (unsigned long long)created, (unsigned long long)seq);
    const int64_t n_prompt = static_cast<int64_t>(cr->prompt.size());
    {
      std::lock_guard lk(mu);
      ++counts.requests;
      counts.prompt_tokens += n_prompt;
    }
    if (!enqueue(ch)) return reply_error(res, Status(ErrorCode::kInternal, "the server is shutting down"));
    auto text = std::make_shared<TextState>(tok, cr->prompt, cr->stop);
    if (cr->echo && cr->logprobs >= 0) text->echo(cr->prompt[0], static_cast<int64_t>(cr->prompt_text.size()));
    auto usage = [n_prompt, text] {
      return json{{"prompt_tokens", n_prompt},
                  {"completion_tokens", text->n_generated},
                  {"total_tokens", n_prompt + text->n_generated},
                  {"prompt_tokens_details", {{"cached_tokens", text->cached}}}};
    };
    auto done_log = [this, ch, text, n_prompt, id] {
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - ch->t_submit).count();
      log(strprintf("ferry: serve: %s: %lld prompt (%lld cached) + %lld generated tokens in %.0f ms (%.1f tok/s), %s", id.c_str(), (long long)n_prompt,
                    (long long)text->cached, (long long)text->n_generated, ms, ms > 0 ? text->n_generated / (ms / 1e3) : 0.0,
                    text->finish == FinishReason::kNone ? "cancelled" : openai_finish(text->finish)));
    };
    const char* object = chat ? "chat.completion" : "text_completion";
    if (!cr->stream) {
      std::string out;
      std::vector<EngineEvent> events;
      while (text->finish == FinishReason::kNone && ch->take(events)) out += text->add(events);
      ch->cancel.store(true);  // a stop string ended it early: free its blocks (no-op when finished)
      {
        std::lock_guard lk(ch->mu);
        if (!ch->error.empty() && text->finish == FinishReason::kNone) return reply_error(res, Status(ErrorCode::kInternal, ch->error));
      }
      json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", openai_finish(text->finish)}};
      if (cr->logprobs >= 0) choice["logprobs"] = text->take_logprobs(chat);
      if (chat)
        choice["message"] = {{"role", "assistant"}, {"content", out}};
      else
        choice["text"] = cr->echo ? cr->prompt_text + out : out;
      const json r = {{"id", id}, {"object", object}, {"created", created}, {"model", opts.model_id}, {"choices", json::array({choice})}, {"usage", usage()}};
      res.set_content(r.dump(), "application/json");
      done_log();
      return;
    }
    // Streamed: one server-sent event per batch of tokens the engine hands over.
    const std::string chunk_object = chat ? "chat.completion.chunk" : "text_completion";
    const bool include_usage = cr->include_usage, with_logprobs = cr->logprobs >= 0;
    auto first = std::make_shared<bool>(true);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, ch, text, usage, done_log, id, chunk_object, chat, include_usage, with_logprobs, first](size_t, httplib::DataSink& sink) {
          auto chunk = [&](const std::string& piece, const char* finish) {
            json choice = {{"index", 0}, {"logprobs", nullptr}, {"finish_reason", finish ? json(finish) : json(nullptr)}};
            if (with_logprobs && !text->logprobs.empty()) choice["logprobs"] = text->take_logprobs(chat);
            if (chat) {
              json delta = json::object();
              if (*first) delta["role"] = "assistant";
              if (!piece.empty() || *first) delta["content"] = piece;
              choice["delta"] = delta;
            } else {
              choice["text"] = piece;
            }
            *first = false;
            const json c = {{"id", id}, {"object", chunk_object}, {"created", created}, {"model", opts.model_id}, {"choices", json::array({choice})}};
            const std::string line = "data: " + c.dump() + "\n\n";
            return sink.write(line.data(), line.size());
          };
          std::vector<EngineEvent> events;
          const bool more = ch->take(events);
          const std::string piece = text->add(events);
          if (text->finish != FinishReason::kNone) {
            ch->cancel.store(true);
            if (!piece.empty() && !chunk(piece, nullptr)) return false;
            if (!chunk("", openai_finish(text->finish))) return false;
            if (include_usage) {
              const json u = {{"id", id}, {"object", chunk_object}, {"created", created}, {"model", opts.model_id}, {"choices", json::array()}, {"usage", usage()}};
              const std::string line = "data: " + u.dump() + "\n\n";
              if (!sink.write(line.data(), line.size())) return false;
            }
            const std::string end = "data: [DONE]\n\n";
            sink.write(end.data(), end.size());
            sink.done();
            done_log();
            return true;
          }
          if (!more) {  // the engine failed or the server is stopping
            std::string why;
            {
              std::lock_guard lk(ch->mu);
              why = ch->error;
            }
            const std::string line = "data: " + error_body(why, 500).dump() + "\n\ndata: [DONE]\n\n";
            sink.write(line.data(), line.size());
            sink.done();
            text->finish = FinishReason::kCancelled;  // ended here (the releaser need not say so)
            log(strprintf("ferry: serve: %s: failed after %lld tokens: %s", id.c_str(), (long long)text->n_generated, why.c_str()));
            std::lock_guard lk(mu);
            ++counts.refused;
            return true;
          }
          if (!piece.empty() || *first) return chunk(piece, nullptr);
          return true;  // held back (half a character, the start of a stop string): wait for more
        },
        [this, ch, text, id](bool) {  // the stream ended, or the client went away
          ch->cancel.store(true);
          if (text->finish == FinishReason::kNone)
            log(strprintf("ferry: serve: %s: the client went away after %lld tokens; the request is cancelled", id.c_str(), (long long)text->n_generated));
        });
  }

  void routes() {
    if (!opts.api_key.empty())
      http.set_pre_routing_handler([this](const httplib::Request& q, httplib::Response& res) {
        if (q.path == "/health" || q.get_header_value("Authorization") == "Bearer " + opts.api_key) return httplib::Server::HandlerResponse::Unhandled;
        res.status = 401;
        json e = error_body("a missing or wrong API key: send \"Authorization: Bearer <key>\" with the key the server was started with (--api-key)", 401);
        e["error"]["code"] = "invalid_api_key";
        res.set_content(e.dump(), "application/json");
        return httplib::Server::HandlerResponse::Handled;
      });
    http.Get("/health", [](const httplib::Request&, httplib::Response& res) { res.set_content(R"({"status":"ok"})", "application/json"); });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      ServerCounters c;
      {
        std::lock_guard lk(mu);
        c = counts;
      }
      std::string out;
      auto metric = [&](const char* name, const char* type, const char* help, int64_t v) {
        out += strprintf("# HELP %s %s\n# TYPE %s %s\n%s %lld\n", name, help, name, type, name, (long long)v);
      };
      metric("ferry_requests_total", "counter", "Requests taken into the engine.", c.requests);
      metric("ferry_requests_refused_total", "counter", "Requests answered with an error.", c.refused);
      metric("ferry_prompt_tokens_total", "counter", "Prompt tokens of the requests taken.", c.prompt_tokens);
      metric("ferry_generation_tokens_total", "counter", "Tokens generated.", c.generated_tokens);
      metric("ferry_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache (not prefilled).", c.cached_prompt_tokens);
      metric("ferry_steps_total", "counter", "Engine steps run.", c.steps);
      metric("ferry_requests_running", "gauge", "Requests in the running batch.", c.live);
      metric("ferry_requests_waiting", "gauge", "Requests waiting for a batch slot or K/V blocks.", c.queued);
      res.set_content(out, "text/plain; version=0.0.4");
    });
    http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      const json m = {{"id", opts.model_id}, {"object", "model"}, {"created", created}, {"owned_by", "ferry"}, {"max_model_len", opts.ctx}};
      res.set_content(json{{"object", "list"}, {"data", json::array({m})}}.dump(), "application/json");
    });
    http.Post("/v1/completions", [this](const httplib::Request& q, httplib::Response& r) { handle_completion(q, r, false); });
    http.Post("/v1/chat/completions", [this](const httplib::Request& q, httplib::Response& r) { handle_completion(q, r, true); });
    http.set_error_handler([](const httplib::Request& q, httplib::Response& res) {
      if (!res.body.empty()) return;
      const std::string msg = res.status == 404 ? "no route " + q.method + " " + q.path + " (ferry serves /health, /metrics, /v1/models, /v1/completions, /v1/chat/completions)"
                                                : strprintf("HTTP %d", res.status);
      res.set_content(error_body(msg, res.status).dump(), "application/json");
    });
    http.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown exception";
      try {
        if (ep) std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      log("ferry: serve: a handler failed: " + what);
      res.status = 500;
      res.set_content(error_body(what, 500).dump(), "application/json");
    });
  }
};

Server::Server(Runner& runner, const Tokenizer& tok, ServerOptions opts) : impl_(std::make_unique<Impl>(runner, tok, std::move(opts))) {}

Server::~Server() { stop(); }

Expected<int> Server::start() {
  Impl& s = *impl_;
  FERRY_RETURN_IF_ERROR(s.engine.validate_options());
  if (s.opts.ctx < 2) return invalid_argument("--ctx must be at least 2 tokens");
  const int n_threads = s.opts.n_http_threads > 0 ? s.opts.n_http_threads : static_cast<int>(2 * s.opts.engine.batch + 4);
  s.http.new_task_queue = [n_threads] { return new httplib::ThreadPool(static_cast<size_t>(n_threads)); };
  s.routes();
  // Debian's cpp-httplib 0.11 listens with a backlog of 5: a burst of connections overflows the
  // accept queue and some clients read a reset a second later (the load test saw it with 24
  // clients). A second listen() on the bound socket raises it. The socket options replace the
  // library's: SO_REUSEADDR only, not SO_REUSEPORT (a second server on the port must fail).
  int listen_fd = -1;
  s.http.set_socket_options([&listen_fd](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    listen_fd = sock;
  });
  int port = s.opts.port;
  if (port == 0) {
    port = s.http.bind_to_any_port(s.opts.host);
    if (port < 0) return io_error(strprintf("--host %s: cannot bind any port", s.opts.host.c_str()));
  } else if (!s.http.bind_to_port(s.opts.host, port)) {
    return io_error(strprintf("--host %s --port %d: cannot bind (in use, or not an address of this machine)", s.opts.host.c_str(), port));
  }
  if (listen_fd >= 0 && ::listen(listen_fd, SOMAXCONN) != 0)
    return io_error(strprintf("--host %s --port %d: listen failed: %s", s.opts.host.c_str(), port, std::strerror(errno)));
  s.started = true;
  s.engine_thread = std::thread([&s] { s.engine_loop(); });
  s.listen_thread = std::thread([&s] { s.http.listen_after_bind(); });
  return port;
}

void Server::stop() {
  Impl& s = *impl_;
  if (!s.started) return;
  {
    std::lock_guard lk(s.mu);
    s.stopping = true;
    s.cv.notify_all();
  }
  if (s.engine_thread.joinable()) s.engine_thread.join();  // every handler's channel is now done
  s.http.stop();
  if (s.listen_thread.joinable()) s.listen_thread.join();
  s.started = false;
}

ServerCounters Server::counters() const {
  std::lock_guard lk(impl_->mu);
  return impl_->counts;
}

}  // namespace ferry
