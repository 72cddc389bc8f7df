// `qlora chat`: a conversation in the terminal with a model and its adapters
// (docs/serving.md). The conversation lives in serve/chat_session; this file
// reads lines, streams replies to stdout and turns Ctrl-C into "stop this
// reply" (not "leave").
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/error.h"
#include "model/builtin.h"
#include "model/llama_generate.h"
#include "serve/chat_session.h"
#include "serve/served_models.h"

namespace qlora::cli {

namespace {

// Set by SIGINT while a reply is generated; at the prompt SIGINT only prints a hint.
std::atomic<bool> g_interrupt{false};
std::atomic<bool> g_generating{false};

void on_sigint(int) {
  if (g_generating.load()) {
    g_interrupt.store(true);
  } else {
    static const char kHint[] = "\n(/quit or Ctrl-D leaves)\n";
    const ssize_t n = write(STDOUT_FILENO, kHint, sizeof kHint - 1);
    (void)n;
  }
}

Runner add_chat(CLI::App& app) {
  auto* cmd = app.add_subcommand("chat", "Chat with a model (+ LoRA adapters) in the terminal, on the CPU");
  struct Args {
    std::string model, base_name = "base", system, chat_template = "auto", use;
    std::vector<std::string> adapters;
    int64_t max_new = 256, context = 0;
    float temperature = 0.0f, top_p = 1.0f;
    uint64_t seed = 0;
    bool dense = false, allow_other_base = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->model, "HF model folder, bnb 4-bit checkpoint, GGUF file, or builtin:tiny")
      ->required();
  cmd->add_option("--adapter", a->adapters,
                  "PEFT adapter NAME=DIR, or DIR (named after its folder); repeatable; the first one answers")
      ->take_all();
  cmd->add_option("--use", a->use,
                  "The model answering at the start (default: the first adapter, else the base)");
  cmd->add_option("--name", a->base_name, "The base model's name (for /adapter)")->capture_default_str();
  cmd->add_option("--system", a->system, "System prompt");
  cmd->add_option("--chat-template", a->chat_template, "Chat template (auto = the model's own)")
      ->capture_default_str();
  cmd->add_option("--max-new-tokens", a->max_new, "Most tokens per reply")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--context", a->context,
                  "Tokens the conversation may hold (default: the model's positions, at most 4096)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--temperature", a->temperature, "0 = greedy")->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", a->top_p, "Nucleus sampling mass")->check(CLI::Range(0.0f, 1.0f));
  cmd->add_option("--seed", a->seed, "Sampling seed (each reply starts from it)");
  cmd->add_flag("--dense", a->dense, "Keep the base weights fp32 instead of NF4");
  cmd->add_flag("--allow-other-base", a->allow_other_base,
                "Use adapters that record another base model's fingerprint (docs/serving.md#base-lock)");
  return [a]() {
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
    const int64_t context =
        a->context > 0 ? a->context : std::min<int64_t>(4096, models.config().max_position_embeddings);
    LlamaGenerator gen(models.base(), nullptr, context, models.max_rank());
    GenerationSettings gs;
    gs.max_new_tokens = a->max_new;
    gs.sampling = {a->temperature, a->top_p};
    gs.seed = a->seed;
    const std::vector<std::string> names = models.names();
    const std::string start = !a->use.empty() ? a->use : names.size() > 1 ? names[1] : names[0];
    ChatSession chat(models, gen, gs, a->system, start);

    struct sigaction sa {};
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESTART;  // the prompt's read goes on after a Ctrl-C
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, nullptr);

    const bool tty = isatty(STDIN_FILENO) != 0;
    std::string list;
    for (const auto& n : names) list += " " + n;
    std::fprintf(stderr, "chat: models:%s; answering: %s. %s", list.c_str(), chat.model().c_str(),
                 ChatSession::help());
    auto out = [](const std::string& s) {
      std::fwrite(s.data(), 1, s.size(), stdout);
      std::fflush(stdout);
    };
    std::string line;
    for (;;) {
      if (tty) out(chat.model() + "> ");
      if (!std::getline(std::cin, line)) break;
      g_interrupt = false;
      g_generating = !line.empty() && line[0] != '/';  // a reply follows
      const auto outcome = chat.handle(line, out, &g_interrupt);
      g_generating = false;
      if (outcome == ChatSession::Outcome::quit) break;
    }
    if (tty) out("\n");
    return 0;
  };
}

const CommandRegistration kRegistered(52, add_chat);

}  // namespace

}  // namespace qlora::cli
