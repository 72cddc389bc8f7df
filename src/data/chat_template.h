// Chat templates: a conversation -> the exact text the model family's Jinja
// chat template produces, cut into segments that say which text is trained.
//
// We do not run Jinja. Each supported template is re-implemented in C++ (see
// chat_template.cpp for each one's exact format and source) because a Jinja
// engine would be a large dependency, and because a Jinja template only yields
// a string: the per-turn training mask (assistant text + end-of-turn token) has
// to be known anyway, which a hand-written renderer gives for free. Tests check
// the rendered text against what the real templates produce.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

enum class Role { system, user, assistant };
const char* role_name(Role r);

struct Message {
  Role role = Role::user;
  std::string content;
  // Alpaca records only: the record's "input", kept apart from the instruction
  // (content) so the alpaca template can render its "### Input:" section. Every
  // other template sees user_text() = content + "\n" + input (LLaMA-Factory's
  // joining of instruction and input).
  std::string input;
  std::string user_text() const { return input.empty() ? content : content + "\n" + input; }
};
using Conversation = std::vector<Message>;

// One piece of rendered text. trained: part of what the model learns to
// produce (assistant replies and the token that ends them). special_text: the
// text is one special/added token (e.g. "<|eot_id|>") and must be encoded as
// its single id, never through BPE.
struct Segment {
  std::string text;
  bool trained = false;
  bool special_text = false;
  bool operator==(const Segment&) const = default;
};

struct TemplateOptions {
  // Llama 3.1+ system header "Today Date: ...". The Llama 3.1/3.3 templates
  // default to "26 Jul 2024"; Llama 3.2's uses today's date when rendered by
  // transformers. Training data should not change with the day it is
  // tokenized, so we always use this fixed string unless told otherwise.
  std::string date_string = "26 Jul 2024";
  // alpaca and none: the tokenizer's EOS text (e.g. "</s>", "<|end_of_text|>"),
  // appended to every assistant turn. These templates belong to no model
  // family, so the EOS must come from the tokenizer (template_for_tokenizer in
  // tokenize_sample.h fills it in).
  std::string eos_token;
  // qwen3: Jinja's enable_thinking. false renders an empty think block
  // "<think>\n\n</think>\n\n" after the generation prompt; true (the
  // template's default, enable_thinking undefined) renders none. The name
  // "qwen3-nothink" sets it false.
  bool enable_thinking = true;
};

class ChatTemplate {
 public:
  enum class Kind {
    llama3,
    llama31,
    llama2,
    mistral_v1,
    mistral_v3,
    mistral_nemo,
    chatml,
    qwen25,
    qwen3,
    smollm2,
    alpaca,
    none
  };

  // By name (see names()); aliases: llama3.2/llama3.3 -> llama3.1,
  // mistral -> mistral-v1, smollm -> chatml, qwen/qwen2 -> qwen2.5,
  // qwen3-nothink -> qwen3 with enable_thinking false. Unknown name -> Error
  // listing the names.
  static ChatTemplate named(std::string_view name, TemplateOptions options = {});
  // Recognizes a tokenizer_config.json chat_template (Jinja source) by robust
  // markers; nullopt when it is none of ours.
  static std::optional<Kind> detect(std::string_view jinja);
  // name == "auto": detect from jinja (Error listing the names when jinja is
  // absent or unrecognized); otherwise named(name).
  static ChatTemplate resolve(std::string_view name, const std::optional<std::string>& jinja,
                              TemplateOptions options = {});
  // The canonical names, in a stable order (for messages and docs).
  static std::vector<std::string> names();
  static std::string name_of(Kind k);

  Kind kind() const { return kind_; }
  std::string name() const { return name_of(kind_); }
  const TemplateOptions& options() const { return options_; }
  // True when the template's text starts with the BOS token itself (Llama 2/3,
  // Mistral), so the tokenizer must not add another.
  bool renders_bos() const;

  // The rendered conversation. Adjacent segments with the same flags are
  // merged. Errors (qlora::Error) on a conversation the real template rejects
  // (e.g. Llama 2 / Mistral need user/assistant alternation after an optional
  // leading system message) or that is empty.
  // add_generation_prompt: then what the template puts before the model's next
  // reply, as Jinja's add_generation_prompt=True (the assistant header of
  // Llama 3 and ChatML, plus Qwen3's empty think block when enable_thinking is
  // false; nothing for the [INST] families, alpaca and none).
  std::vector<Segment> render(const Conversation& conversation, bool add_generation_prompt = false) const;
  // Concatenated text of render(): what the Jinja template returns (with
  // add_generation_prompt=false).
  std::string render_text(const Conversation& conversation) const;

 private:
  ChatTemplate(Kind k, TemplateOptions o) : kind_(k), options_(std::move(o)) {}
  Kind kind_;
  TemplateOptions options_;
};

// The Llama 2 chat default system prompt, which Meta's reference code, FastChat
// and axolotl insert when a conversation has none. The HF Jinja template does
// not; callers that want it add it as a system message.
extern const char* const kLlama2DefaultSystemPrompt;

}  // namespace qlora
