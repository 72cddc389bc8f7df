#include "serve/http_server.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <ctime>

#include "core/error.h"

namespace qlora {

using nlohmann::json;

namespace {

void send_json(httplib::Response& res, int status, const json& j) {
  res.status = status;
  res.set_content(json_text(j), "application/json");
}

void send_error(httplib::Response& res, const ApiError& e) {
  send_json(res, e.status, error_body(e));
}

std::string next_id(const char* prefix) {
  static std::atomic<uint64_t> counter{0};
  const uint64_t n = ++counter;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s-%llx%06llx", prefix, (unsigned long long)std::time(nullptr),
                (unsigned long long)n);
  return buf;
}

}  // namespace

HttpServer::HttpServer(CompletionService& service, const HttpOptions& opt, std::FILE* log)
    : service_(service),
      opt_(opt),
      log_(log),
      server_(std::make_unique<httplib::Server>()),
      created_(int64_t(std::time(nullptr))) {
  // One HTTP thread per running or waiting request (they block in the
  // Admission queue), plus a few for /health, /v1/models and refusals.
  const size_t threads = size_t(service.limits().generators + service.limits().queue + 4);
  server_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  server_->set_payload_max_length(opt.max_body_bytes);
  server_->set_keep_alive_timeout(2);
  routes();
}

HttpServer::~HttpServer() = default;

int HttpServer::bind() {
  const int port = opt_.port == 0 ? server_->bind_to_any_port(opt_.host)
                                  : (server_->bind_to_port(opt_.host, opt_.port) ? opt_.port : -1);
  if (port < 0)
    fail("cannot listen on ", opt_.host, ":", opt_.port, " (address in use, or not this machine's)");
  return port;
}

void HttpServer::listen() {
  server_->listen_after_bind();
}

bool HttpServer::running() const {
  return server_->is_running();
}

void HttpServer::stop() {
  service_.admission().shutdown();
  server_->stop();
}

void HttpServer::routes() {
  httplib::Server& s = *server_;
  // httplib's own refusals (unknown path, body over the limit, unparsable
  // HTTP) get OpenAI's error shape too.
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    if (res.status == 404)
      send_error(res, ApiError(404, "invalid_request_error", "no route " + req.method + " " + req.path, "",
                               "unknown_url"));
    else if (res.status == 413)
      send_error(res, ApiError(413, "invalid_request_error", "the request body is too large", "",
                               "request_too_large"));
    else
      send_error(res, ApiError(res.status, "invalid_request_error",
                               "bad request (HTTP status " + std::to_string(res.status) + ")"));
  });
  s.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    std::fprintf(log_, "serve: internal error: %s\n", what.c_str());
    std::fflush(log_);
    send_error(res, ApiError(500, "server_error", "internal error: " + what));
  });

  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const auto c = service_.admission().counts();
    send_json(res, service_.admission().shutting_down() ? 503 : 200,
              json{{"status", service_.admission().shutting_down() ? "shutting down" : "ok"},
                   {"models", service_.models().names()},
                   {"running", c.running},
                   {"waiting", c.waiting},
                   {"generators", service_.admission().slots()},
                   {"queue", service_.admission().queue()}});
  });

  s.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json data = json::array();
    for (const auto& name : service_.models().names()) {
      json m{{"id", name}, {"object", "model"}, {"created", created_}, {"owned_by", "qlora"}};
      m["parent"] =
          name == service_.models().base_name() ? json(nullptr) : json(service_.models().base_name());
      data.push_back(m);
    }
    send_json(res, 200, json{{"object", "list"}, {"data", data}});
  });

  auto completion = [this](Endpoint endpoint) {
    return [this, endpoint](const httplib::Request& req, httplib::Response& res) {
      const auto t0 = std::chrono::steady_clock::now();
      std::shared_ptr<PreparedCompletion> p;
      std::shared_ptr<Admission::Ticket> ticket;
      try {
        p = std::make_shared<PreparedCompletion>(
            service_.prepare(parse_completion_request(req.body, endpoint)));
        auto t = service_.admission().try_enter();
        if (!t) {
          if (service_.admission().shutting_down())
            throw ApiError(503, "server_error", "the server is shutting down", "", "shutting_down");
          const auto c = service_.admission().counts();
          throw ApiError(429, "rate_limit_error",
                         "the server is busy: " + std::to_string(c.running) + " generations running and " +
                             std::to_string(c.waiting) +
                             " waiting (qlora serve --parallel, --queue); retry later",
                         "", "rate_limit_exceeded");
        }
        ticket = std::make_shared<Admission::Ticket>(std::move(*t));
      } catch (const ApiError& e) {
        send_error(res, e);
        return;
      }
      const std::string id = next_id(endpoint == Endpoint::chat ? "chatcmpl" : "cmpl");
      const int64_t created = int64_t(std::time(nullptr));
      const std::string& fp = service_.models().fingerprint();
      auto log_done = [this, t0, p](const CompletionResult& r) {
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(log_, "serve: %s%s %s: %lld prompt + %lld completion tokens, %s, %.2f s\n",
                     p->request.endpoint == Endpoint::chat ? "chat" : "completion",
                     p->request.stream ? " (stream)" : "", p->request.model.c_str(),
                     (long long)r.usage.prompt_tokens, (long long)r.usage.completion_tokens,
                     finish_reason_name(r.finish), secs);
        std::fflush(log_);
      };
      if (!p->request.stream) {
        try {
          const CompletionResult r = service_.run(*ticket, *p);
          log_done(r);
          send_json(res, 200,
                    completion_response(p->request, id, created, r.text, finish_reason_name(r.finish),
                                        r.usage, fp));
        } catch (const ApiError& e) {
          send_error(res, e);
        }
        return;
      }
      // Streaming: the status line goes out now; the provider runs the
      // generation on this HTTP thread and writes one event per piece.
      res.set_header("Cache-Control", "no-cache");
      res.set_chunked_content_provider("text/event-stream", [this, p, ticket, id, created, fp, log_done](
                                                                size_t, httplib::DataSink& sink) {
        auto write = [&](const std::string& text) { return sink.write(text.data(), text.size()); };
        bool first = true;
        try {
          const CompletionResult r = service_.run(*ticket, *p, [&](const std::string& piece) {
            const bool ok =
                write(sse_event(completion_chunk(p->request, id, created, piece, std::nullopt, first, fp)));
            first = false;
            return ok;
          });
          log_done(r);
          if (first) write(sse_event(completion_chunk(p->request, id, created, "", std::nullopt, true, fp)));
          write(sse_event(completion_chunk(p->request, id, created, "",
                                           std::string(finish_reason_name(r.finish)), false, fp)));
          if (p->request.include_usage) write(sse_event(usage_chunk(p->request, id, created, r.usage, fp)));
        } catch (const ApiError& e) {
          write(sse_event(error_body(e)));
        } catch (const std::exception& e) {
          write(sse_event(
              error_body(ApiError(500, "server_error", std::string("internal error: ") + e.what()))));
        }
        write(std::string(kSseDone));
        sink.done();
        return true;
      });
    };
  };
  s.Post("/v1/chat/completions", completion(Endpoint::chat));
  s.Post("/v1/completions", completion(Endpoint::completion));
}

}  // namespace qlora
