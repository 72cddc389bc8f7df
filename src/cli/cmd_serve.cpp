// `qlora serve`: an OpenAI-compatible HTTP server over one base model with any
// number of unmerged LoRA adapters (docs/serving.md). The work lives in
// src/serve; this file parses arguments, prints the memory table and turns
// SIGINT/SIGTERM into a clean stop.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "model/builtin.h"
#include "serve/completion_service.h"
#include "serve/http_server.h"
#include "serve/served_models.h"

namespace qlora::cli {

namespace {

// The self-pipe the stop signals write to (a signal handler may only do
// async-signal-safe things; write() is one).
int g_stop_pipe[2] = {-1, -1};

void on_stop_signal(int sig) {
  const char c = char(sig);
  const ssize_t n = write(g_stop_pipe[1], &c, 1);
  (void)n;
}

Runner add_serve(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "serve", "OpenAI-compatible HTTP server: one base model, many LoRA adapters picked per request (CPU)");
  struct Args {
    std::string model, base_name = "base", host = "127.0.0.1", chat_template = "auto";
    std::vector<std::string> adapters;
    int port = 8080, parallel = 1, queue = 32;
    int64_t context = 0, max_tokens = 256, max_body_kib = 1024;
    bool dense = false, allow_other_base = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->model, "HF model folder, bnb 4-bit checkpoint, GGUF file, or builtin:tiny")
      ->required();
  cmd->add_option("--adapter", a->adapters,
                  "PEFT adapter NAME=DIR, or DIR (named after its folder; a run's adapter/ after the run); "
                  "repeatable")
      ->take_all();
  cmd->add_option("--name", a->base_name, "The base model's name in requests and /v1/models")
      ->capture_default_str();
  cmd->add_option("--host", a->host, "Address to listen on (0.0.0.0: every interface)")
      ->capture_default_str();
  cmd->add_option("--port", a->port, "Port (0: any free port, printed)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  cmd->add_option("--parallel", a->parallel, "Generations running at once (each has its own KV cache)")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cmd->add_option("--queue", a->queue, "Requests waiting beyond those; more get 429")
      ->check(CLI::Range(0, 4096))
      ->capture_default_str();
  cmd->add_option("--context", a->context,
                  "Tokens per generation, prompt + reply (default: the model's positions, at most 2048)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-tokens", a->max_tokens, "Default and largest max_tokens of a request")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--max-body-kib", a->max_body_kib, "Largest request body; larger get 413")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--chat-template", a->chat_template, "Chat template (auto = the model's own)")
      ->capture_default_str();
  cmd->add_flag("--dense", a->dense, "Keep the base weights fp32 instead of NF4");
  cmd->add_flag("--allow-other-base", a->allow_other_base,
                "Serve adapters that record another base model's fingerprint (docs/serving.md#base-lock)");
  return [a]() {
    // SIGINT/SIGTERM: the handler writes the signal into a pipe and a
    // stopper thread stops the server. (Blocking the signals and sigwait()
    // would not do: OpenBLAS starts its threads when it loads, before main,
    // and a signal delivered to one of them would kill the process.)
    if (pipe(g_stop_pipe) != 0) fail("serve: cannot create a pipe");
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);

    ServedModelOptions mo;
    mo.model = resolve_model_path(a->model);
    mo.base_name = a->base_name;
    mo.adapters = a->adapters;
    mo.allow_other_base = a->allow_other_base;
    mo.weights.quantize = !a->dense;
    mo.chat_template = a->chat_template;
    std::vector<std::string> warnings;
    const ServedModels models(mo, &warnings);
    for (const auto& w : warnings) std::fprintf(stderr, "%s\n", w.c_str());
    if (!models.chat_template())
      std::fprintf(stderr, "warning: %s; /v1/chat/completions is refused, /v1/completions works\n",
                   models.chat_template_error().c_str());

    ServiceLimits limits;
    limits.context =
        a->context > 0 ? a->context : std::min<int64_t>(2048, models.config().max_position_embeddings);
    limits.max_tokens = std::min(a->max_tokens, limits.context - 1);
    limits.generators = a->parallel;
    limits.queue = a->queue;
    std::printf("serve: memory of %s + %zu adapter%s, %d generation%s at once of up to %lld tokens:\n%s",
                a->model.c_str(), models.names().size() - 1, models.names().size() == 2 ? "" : "s",
                limits.generators, limits.generators == 1 ? "" : "s", (long long)limits.context,
                served_memory_table(models, limits.context, limits.generators).c_str());
    CompletionService service(models, limits);

    HttpOptions ho;
    ho.host = a->host;
    ho.port = a->port;
    ho.max_body_bytes = size_t(a->max_body_kib) * 1024;
    HttpServer server(service, ho, stdout);
    const int port = server.bind();
    std::string names;
    for (const auto& n : models.names()) names += (names.empty() ? "" : ", ") + n;
    std::printf("serve: models %s (base fingerprint %s); queue %d\n", names.c_str(),
                models.fingerprint().c_str(), limits.queue);
    std::printf("serve: listening on http://%s:%d/v1\n", a->host.c_str(), port);
    std::fflush(stdout);

    std::atomic<bool> listening_done{false};
    std::thread stopper([&] {
      char sig = 0;
      while (read(g_stop_pipe[0], &sig, 1) < 0 && errno == EINTR) {
      }
      if (listening_done) return;  // woken by main below
      std::printf("serve: %s: stopping (requests in flight finish, waiting ones get 503)\n",
                  sig == SIGINT ? "SIGINT" : "SIGTERM");
      std::fflush(stdout);
      // A signal that came while listen() was still starting waits for it.
      while (!listening_done && !server.running()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (!listening_done) server.stop();
    });
    server.listen();
    listening_done = true;
    const char wake = 0;  // listen() ended on its own (or after the stopper): let the stopper end
    if (write(g_stop_pipe[1], &wake, 1) != 1) std::fprintf(stderr, "serve: cannot wake the stopper\n");
    stopper.join();
    std::printf("serve: stopped\n");
    return 0;
  };
}

const CommandRegistration kRegistered(55, add_serve);

}  // namespace

}  // namespace qlora::cli
