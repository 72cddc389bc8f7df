// `qlora chat`'s conversation, apart from the terminal: the history, the
// adapter in use, the /commands, and each reply generated exactly as
// `qlora generate --chat` generates a first reply (serve/generation.h), with
// the text streamed out as it grows.
#pragma once

#include <atomic>
#include <functional>
#include <string>

#include "data/chat_template.h"
#include "model/llama_generate.h"
#include "serve/generation.h"
#include "serve/served_models.h"

namespace qlora {

class ChatSession {
 public:
  // gen: one generator, reused for every reply (its size bounds the
  // conversation). model: the base's name or an adapter's.
  ChatSession(const ServedModels& models, LlamaGenerator& gen, const GenerationSettings& settings,
              std::string system, const std::string& model);

  enum class Outcome { replied, command, quit };
  // A line the user typed: a /command, or a message answered through `out`
  // (pieces of text as they become final, then "\n"). *interrupt turning
  // true stops the reply where it is (it stays in the history as shown).
  Outcome handle(const std::string& line, const std::function<void(const std::string&)>& out,
                 const std::atomic<bool>* interrupt = nullptr);

  const Conversation& history() const { return history_; }
  const std::string& model() const { return model_; }
  static const char* help();

 private:
  void reply(const std::function<void(const std::string&)>& out, const std::atomic<bool>* interrupt);
  const ServedModels& models_;
  LlamaGenerator& gen_;
  GenerationSettings settings_;
  std::string system_, model_;
  Conversation history_;
};

}  // namespace qlora
