// `qlora tokenize`: encode a text with a model folder's tokenizer and show
// the ids and their vocabulary pieces (--ids-only: just the ids). --chat:
// the input is a conversation (OpenAI messages JSON), rendered through the
// chat template, and each token is marked trained or not.
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "cli/commands.h"
#include "core/error.h"
#include "core/json_parse.h"
#include "data/dataset_reader.h"
#include "data/tokenize_sample.h"
#include "tokenizer/tokenizer.h"

namespace qlora::cli {

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open text file");
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// Pieces are shown as JSON strings so spaces, newlines and stray bytes stay
// visible and one token is always one line.
std::string quoted(const std::string& piece) {
  return nlohmann::json(piece).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// generation_prompt: the conversation as it waits for the model's reply, with
// what the template puts before it (Jinja's add_generation_prompt=True).
int print_chat(const Tokenizer& tk, const std::string& input, const std::string& template_name, bool ids_only,
               bool generation_prompt) {
  nlohmann::json j;
  try {
    j = parse_json(input, "tokenize --chat input");
  } catch (const nlohmann::json::exception& e) {
    fail("tokenize --chat: the input is not valid JSON: ", e.what());
  }
  if (j.is_array()) j = nlohmann::json{{"messages", j}};
  ReadOptions ro;
  ro.format = DataFormat::messages;
  // A conversation waiting for a reply need not hold an assistant message:
  // a placeholder passes the reader's check and is taken off again.
  if (generation_prompt && j.contains("messages") && j["messages"].is_array())
    j["messages"].push_back({{"role", "assistant"}, {"content", "x"}});
  Sample sample = record_to_sample(j, ro);
  if (generation_prompt) sample.conversation.pop_back();
  const ChatTemplate tmpl = template_for_tokenizer(tk, template_name);
  const TokenizedSample t = generation_prompt
                                ? tokenize_segments(tk, tmpl.render(sample.conversation, true),
                                                    !tmpl.renders_bos() && tokenizer_adds_bos(tk), false)
                                : tokenize_sample(tk, tmpl, sample, {});
  std::string out;
  size_t trained = 0;
  for (size_t i = 0; i < t.input_ids.size(); ++i) {
    const bool tr = t.labels[i] != kIgnoreLabel;
    trained += tr;
    if (ids_only)
      out += (i ? " " : "") + std::to_string(t.input_ids[i]);
    else
      out += str(t.input_ids[i], "\t", tr ? "train" : "-", "\t", quoted(tk.piece(t.input_ids[i])), "\n");
  }
  out += ids_only ? "\n"
                  : str(t.input_ids.size(), " tokens, ", trained, " trained, template ", tmpl.name(), "\n");
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}

Runner add_tokenize(CLI::App& app) {
  auto* cmd = app.add_subcommand("tokenize", "Encode text with a model's tokenizer and show ids and pieces");
  struct Args {
    std::string tokenizer, text, file, chat_template = "auto";
    bool ids_only = false, chat = false, generation_prompt = false;
    bool no_special = false;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--tokenizer", a->tokenizer, "Folder with tokenizer.json or tokenizer.model (or the file)")
      ->required();
  auto* text = cmd->add_option("--text", a->text, "Text to encode");
  auto* file = cmd->add_option("--file", a->file, "File whose whole content is encoded");
  text->excludes(file);
  file->excludes(text);
  cmd->add_flag("--ids-only", a->ids_only, "Print only the ids, space-separated on one line");
  cmd->add_flag("--no-special", a->no_special,
                "Do not add BOS/EOS (as the tokenizer's post-processor would)");
  cmd->add_flag(
      "--chat", a->chat,
      "The input is a messages JSON ([{\"role\": ..., \"content\": ...}] or {\"messages\": [...]}): "
      "render it with the chat template and mark the trained tokens");
  cmd->add_option("--template", a->chat_template,
                  "Chat template for --chat (auto = from tokenizer_config.json)")
      ->capture_default_str();
  cmd->add_flag("--add-generation-prompt", a->generation_prompt,
                "With --chat: end with what the template puts before the model's reply (Jinja's "
                "add_generation_prompt)");
  return [a, text, file]() {
    if (text->count() == 0 && file->count() == 0) fail("tokenize: give --text or --file");
    const std::string input = file->count() ? read_file(a->file) : a->text;
    const auto tk = Tokenizer::load(a->tokenizer);
    if (a->generation_prompt && !a->chat) fail("tokenize: --add-generation-prompt needs --chat");
    if (a->chat) return print_chat(*tk, input, a->chat_template, a->ids_only, a->generation_prompt);
    const auto ids = tk->encode(input, !a->no_special);
    std::string out;
    if (a->ids_only) {
      for (size_t i = 0; i < ids.size(); ++i) out += (i ? " " : "") + std::to_string(ids[i]);
      out += "\n";
    } else {
      for (TokenId id : ids) out += std::to_string(id) + "\t" + quoted(tk->piece(id)) + "\n";
      out += str(ids.size(), " tokens, ", input.size(), " bytes\n");
    }
    std::fwrite(out.data(), 1, out.size(), stdout);
    return 0;
  };
}

const CommandRegistration kRegistered(40, add_tokenize);

}  // namespace

}  // namespace qlora::cli
