#include "serve/chat_session.h"

#include <algorithm>

#include "core/error.h"
#include "train/sample_text.h"

namespace qlora {

ChatSession::ChatSession(const ServedModels& models, LlamaGenerator& gen, const GenerationSettings& settings,
                         std::string system, const std::string& model)
    : models_(models), gen_(gen), settings_(settings), system_(std::move(system)), model_(model) {
  if (!models.has(model)) models.adapter(model);  // throws, listing the names
  if (!models.chat_template()) fail("chat: ", models.chat_template_error());
  settings_.chat = true;
}

const char* ChatSession::help() {
  return "commands: /reset (forget the conversation), /adapter [NAME] (list or switch; the base by its "
         "name), "
         "/system [TEXT] (set or clear the system prompt; resets), /quit (or Ctrl-D). Ctrl-C stops a "
         "reply.\n";
}

ChatSession::Outcome ChatSession::handle(const std::string& line,
                                         const std::function<void(const std::string&)>& out,
                                         const std::atomic<bool>* interrupt) {
  if (line.empty()) return Outcome::command;
  if (line[0] != '/') {
    history_.push_back({Role::user, line, {}});
    reply(out, interrupt);
    return Outcome::replied;
  }
  const size_t sp = line.find(' ');
  const std::string cmd = line.substr(0, sp);
  std::string arg = sp == std::string::npos ? "" : line.substr(sp + 1);
  while (!arg.empty() && arg.back() == ' ') arg.pop_back();
  if (cmd == "/quit" || cmd == "/exit") return Outcome::quit;
  if (cmd == "/reset") {
    history_.clear();
    out("(conversation cleared)\n");
  } else if (cmd == "/adapter") {
    if (arg.empty()) {
      std::string list;
      for (const auto& n : models_.names()) list += (n == model_ ? " *" : " ") + n;
      out("models:" + list + "\n");
    } else if (!models_.has(arg)) {
      std::string list;
      for (const auto& n : models_.names()) list += " " + n;
      out("no model named \"" + arg + "\"; models:" + list + "\n");
    } else {
      model_ = arg;
      out("(now answering with " + model_ + "; the conversation is kept)\n");
    }
  } else if (cmd == "/system") {
    system_ = arg;
    history_.clear();
    out(system_.empty() ? "(system prompt cleared; conversation cleared)\n"
                        : "(system prompt set; conversation cleared)\n");
  } else if (cmd == "/help") {
    out(help());
  } else {
    out("unknown command " + cmd + "; " + help());
  }
  return Outcome::command;
}

void ChatSession::reply(const std::function<void(const std::string&)>& out,
                        const std::atomic<bool>* interrupt) {
  Conversation c;
  if (!system_.empty()) c.push_back({Role::system, system_, {}});
  c.insert(c.end(), history_.begin(), history_.end());
  std::vector<int32_t> prompt;
  try {
    prompt = chat_prompt_ids(models_.tokenizer(), *models_.chat_template(), c);
  } catch (const Error& e) {
    history_.pop_back();
    out(std::string("(cannot render the conversation: ") + e.what() + ")\n");
    return;
  }
  GenerationSettings s = settings_;
  const int64_t room = gen_.capacity() - int64_t(prompt.size());
  if (room < 1) {
    history_.pop_back();
    out("(the conversation holds " + std::to_string(prompt.size()) + " tokens, the context " +
        std::to_string(gen_.capacity()) + ": /reset to start over)\n");
    return;
  }
  s.max_new_tokens = std::min(s.max_new_tokens, room);
  gen_.set_lora(models_.adapter(model_));
  ReplyText text(models_.tokenizer(), {});
  const GeneratedTokens g =
      generate_tokens(gen_, models_.config().vocab_size, prompt,
                      end_of_sequence_ids(models_.config(), &models_.tokenizer(), true), s, [&](int32_t id) {
                        const std::string piece = text.push(id);
                        if (!piece.empty()) out(piece);
                        return !(interrupt && interrupt->load());
                      });
  const std::string rest = text.finish();
  if (!rest.empty()) out(rest);
  out(g.finish == FinishReason::cancelled ? " [stopped]\n" : "\n");
  history_.push_back({Role::assistant, text.text(), {}});
}

}  // namespace qlora
