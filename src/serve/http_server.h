// `qlora serve`'s HTTP front: cpp-httplib routes onto a CompletionService.
//   GET  /health               {"status": "ok", ...}
//   GET  /v1/models            the base and every adapter
//   POST /v1/chat/completions  OpenAI chat completions (stream: server-sent events)
//   POST /v1/completions       OpenAI (legacy) completions
// Every error is OpenAI's error object with a 4xx/5xx status.
#pragma once

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "serve/completion_service.h"

namespace httplib {
class Server;
}

namespace qlora {

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                  // 0: any free port (printed)
  size_t max_body_bytes = 1 << 20;  // larger bodies get 413
};

class HttpServer {
 public:
  HttpServer(CompletionService& service, const HttpOptions& opt, std::FILE* log);
  ~HttpServer();
  // Binds (throws qlora::Error naming host and port) and returns the port.
  int bind();
  // Serves until stop(); returns then, after the requests in flight finished.
  void listen();
  // From any thread, once: no new connections; waiting requests get 503.
  // Before listen() has started it does nothing (see running()).
  void stop();
  bool running() const;

 private:
  void routes();
  CompletionService& service_;
  HttpOptions opt_;
  std::FILE* log_;
  std::unique_ptr<httplib::Server> server_;
  int64_t created_;
};

}  // namespace qlora
