#include "data/chat_template.h"

#include <algorithm>
#include <utility>

#include "core/error.h"

namespace qlora {

const char* const kLlama2DefaultSystemPrompt =
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false "
    "information.";

const char* role_name(Role r) {
  switch (r) {
    case Role::system:
      return "system";
    case Role::user:
      return "user";
    case Role::assistant:
      return "assistant";
  }
  return "?";
}

namespace {

using Kind = ChatTemplate::Kind;

struct NameEntry {
  const char* name;
  Kind kind;
};
// Canonical names first (names() lists those), then aliases.
constexpr NameEntry kNames[] = {
    {"llama3", Kind::llama3},
    {"llama3.1", Kind::llama31},
    {"llama2", Kind::llama2},
    {"mistral-v1", Kind::mistral_v1},
    {"mistral-v3", Kind::mistral_v3},
    {"mistral-nemo", Kind::mistral_nemo},
    {"chatml", Kind::chatml},
    {"qwen2.5", Kind::qwen25},
    {"qwen3", Kind::qwen3},
    {"smollm2", Kind::smollm2},
    {"alpaca", Kind::alpaca},
    {"none", Kind::none},
    {"llama3.2", Kind::llama31},
    {"llama3.3", Kind::llama31},
    {"mistral", Kind::mistral_v1},
    {"smollm", Kind::chatml},
    {"qwen", Kind::qwen25},
    {"qwen2", Kind::qwen25},
    {"qwen3-nothink", Kind::qwen3},  // named() sets enable_thinking = false
};
constexpr size_t kCanonicalNames = 12;

std::string joined_names() {
  std::string s;
  for (const auto& n : ChatTemplate::names()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

bool contains(std::string_view hay, std::string_view needle) {
  return hay.find(needle) != std::string_view::npos;
}

// Jinja's |trim and Python's str.strip(): leading/trailing whitespace. We strip
// ASCII whitespace only; Python also strips Unicode spaces (U+00A0, U+2000..),
// which chat data practically never starts or ends with.
std::string trim(std::string_view s) {
  constexpr std::string_view ws = " \t\n\r\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  const size_t e = s.find_last_not_of(ws);
  return std::string(s.substr(b, e - b + 1));
}

// Builds the segment list, merging neighbours with equal flags so callers see
// one segment per run of same-kind text.
class Out {
 public:
  void text(std::string_view t, bool trained) { add(t, trained, false); }
  void special(std::string_view t, bool trained) { add(t, trained, true); }
  std::vector<Segment> take() { return std::move(segs_); }

 private:
  void add(std::string_view t, bool trained, bool special) {
    if (t.empty()) return;
    // Special tokens stay one per segment: each becomes exactly one id.
    if (!special && !segs_.empty() && !segs_.back().special_text && segs_.back().trained == trained) {
      segs_.back().text += t;
      return;
    }
    segs_.push_back(Segment{std::string(t), trained, special});
  }
  std::vector<Segment> segs_;
};

// Llama 2 and Mistral templates raise_exception unless roles alternate
// user/assistant/... after one optional leading system message. Returns the
// system message (empty if none) and checks the rest.
std::string split_system_and_check_alternation(const Conversation& c, const char* tmpl,
                                               std::vector<const Message*>& rest) {
  std::string system;
  size_t i = 0;
  if (!c.empty() && c[0].role == Role::system) {
    system = c[0].content;
    i = 1;
  }
  for (size_t k = 0; i < c.size(); ++i, ++k) {
    const Role want = k % 2 == 0 ? Role::user : Role::assistant;
    if (c[i].role != want)
      fail("chat template ", tmpl, ": message ", i, " has role ", role_name(c[i].role),
           " but roles must alternate ", "user/assistant/... after an optional leading system message");
    rest.push_back(&c[i]);
  }
  return system;
}

// ---- Llama 3 ----------------------------------------------------------------
// Meta-Llama-3-8B-Instruct's template (tokenizer_config.json, Apr 2024):
//   <|begin_of_text|> then per message
//   <|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>
// Llama 3.1/3.2/3.3 (fixtures/chat_templates/meta-llama-Llama-3.{1,2,3}-*.jinja,
// no tools): the same, but the first block is always a system block
//   <|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n
//   Today Date: {date_string}\n\n{system message|trim, or ""}<|eot_id|>
// and a leading system message is consumed by it. date_string: see
// TemplateOptions. Trained: assistant content and its <|eot_id|>; the header
// "<|start_header_id|>assistant<|end_header_id|>\n\n" is not (it is prompt).
void render_llama3(const Conversation& c, bool v31, const TemplateOptions& o, Out& out) {
  out.special("<|begin_of_text|>", false);
  size_t i = 0;
  if (v31) {
    std::string system;
    if (!c.empty() && c[0].role == Role::system) {
      system = trim(c[0].content);
      i = 1;
    }
    out.special("<|start_header_id|>", false);
    out.text("system", false);
    out.special("<|end_header_id|>", false);
    out.text("\n\nCutting Knowledge Date: December 2023\nToday Date: " + o.date_string + "\n\n" + system,
             false);
    out.special("<|eot_id|>", false);
  }
  for (; i < c.size(); ++i) {
    const bool asst = c[i].role == Role::assistant;
    out.special("<|start_header_id|>", false);
    out.text(role_name(c[i].role), false);
    out.special("<|end_header_id|>", false);
    out.text("\n\n", false);
    out.text(trim(c[i].user_text()), asst);
    out.special("<|eot_id|>", asst);
  }
}

// ---- Llama 2 ----------------------------------------------------------------
// meta-llama/Llama-2-7b-chat-hf tokenizer_config.json chat_template:
//   for each user turn:  <s>[INST] {content.strip()} [/INST]
//   for each assistant:  ' ' + {content.strip()} + ' ' + </s>
// where the first user content is prefixed by "<<SYS>>\n{system}\n<</SYS>>\n\n"
// when there is a system message (strip() then applies to the combined text).
// Trained: " {reply} </s>". The template adds no default system prompt (see
// kLlama2DefaultSystemPrompt).
void render_llama2(const Conversation& c, Out& out) {
  std::vector<const Message*> msgs;
  const std::string system = split_system_and_check_alternation(c, "llama2", msgs);
  const bool has_system = !c.empty() && c[0].role == Role::system;
  for (size_t k = 0; k < msgs.size(); ++k) {
    if (msgs[k]->role == Role::user) {
      std::string content = msgs[k]->user_text();
      if (k == 0 && has_system) content = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + content;
      out.special("<s>", false);
      out.text("[INST] " + trim(content) + " [/INST]", false);
    } else {
      out.text(" " + trim(msgs[k]->content) + " ", true);
      out.special("</s>", true);
    }
  }
}

// ---- Mistral ----------------------------------------------------------------
// Three generations, each verbatim in fixtures/chat_templates/ (tools ignored;
// consecutive same-role messages, which the v1/v3 templates would merge, are
// refused instead):
//  v1 (mistral_v1_spm.jinja; Mistral-7B-Instruct v0.1/v0.2, Mixtral 8x7B):
//    <s> then per user " [INST] " + [system + "\n\n" on the first user] + content + " [/INST]",
//    then " " when another message follows; per assistant content + </s>.
//    -> "<s> [INST] Hi [/INST] Hello</s> [INST] Bye [/INST] Ciao</s>"
//  v3 (mistral_v3_spm.jinja; Mistral-7B-Instruct v0.3, Mixtral 8x22B):
//    <s> then per user "[INST] " + [system + "\n\n" on the LAST user] + content + "[/INST]";
//    per assistant " " + content + </s>.  -> "<s>[INST] Hi[/INST] Hello</s>[INST] Bye[/INST] Ciao</s>"
//  nemo (mistralai-Mistral-Nemo-Instruct-2407.jinja):
//    <s> then per user "[INST]" + [system + "\n\n" only if this user message is the
//    last message] + content + "[/INST]"; per assistant content + </s>. So the
//    system message vanishes from conversations that end with a reply: that is
//    what the real template does, and what the model was tuned with.
// Trained: the reply (with the space that v1/v3 put before it) and </s>. In v3
// and Nemo tokenizers [INST]/[/INST] are control tokens (special_text); in v1
// they are plain text.
void render_mistral(const Conversation& c, Kind k, Out& out) {
  const char* name = k == Kind::mistral_v1   ? "mistral-v1"
                     : k == Kind::mistral_v3 ? "mistral-v3"
                                             : "mistral-nemo";
  std::vector<const Message*> msgs;
  const std::string system = split_system_and_check_alternation(c, name, msgs);
  size_t last_user = 0;
  for (size_t i = 0; i < msgs.size(); ++i)
    if (msgs[i]->role == Role::user) last_user = i;
  out.special("<s>", false);
  for (size_t i = 0; i < msgs.size(); ++i) {
    const Message& m = *msgs[i];
    if (m.role == Role::assistant) {
      out.text(k == Kind::mistral_nemo ? m.content : " " + m.content, true);
      out.special("</s>", true);
      continue;
    }
    std::string body = m.user_text();
    if (k == Kind::mistral_v1) {
      if (i == 0 && !system.empty()) body = system + "\n\n" + body;
      out.text(" [INST] " + body + " [/INST]", false);
    } else if (k == Kind::mistral_v3) {
      if (i == last_user && !system.empty()) body = system + "\n\n" + body;
      out.special("[INST]", false);
      out.text(" " + body, false);
      out.special("[/INST]", false);
    } else {
      if (i + 1 == msgs.size() && !system.empty()) body = system + "\n\n" + body;
      out.special("[INST]", false);
      out.text(body, false);
      out.special("[/INST]", false);
    }
  }
}

// ---- ChatML -----------------------------------------------------------------
// SmolLM-Instruct (fixtures/tokenizers/smollm-135m-instruct/tokenizer_config.json):
//   per message "<|im_start|>{role}\n{content}<|im_end|>\n"   (no BOS, no default system)
// Qwen2.5 (fixtures/chat_templates/Qwen-Qwen2.5-7B-Instruct.jinja, no tools): the
// same, but when the first message is not a system message it starts with
//   "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
// SmolLM2-Instruct (the fixture GGUF's tokenizer.chat_template): the same with
//   "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
// Trained: assistant content and its <|im_end|>; the "\n" after it is not
// (the model stops at <|im_end|>).
constexpr const char* kQwenSystem = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
constexpr const char* kSmolLM2System = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
void render_chatml(const Conversation& c, const char* default_system, Out& out) {
  if (default_system && (c.empty() || c[0].role != Role::system)) {
    out.special("<|im_start|>", false);
    out.text(std::string("system\n") + default_system, false);
    out.special("<|im_end|>", false);
    out.text("\n", false);
  }
  for (const Message& m : c) {
    const bool asst = m.role == Role::assistant;
    out.special("<|im_start|>", false);
    out.text(std::string(role_name(m.role)) + "\n", false);
    out.text(m.user_text(), asst);
    out.special("<|im_end|>", asst);
    out.text("\n", false);
  }
}

// ---- Qwen3 ------------------------------------------------------------------
// Qwen3's template (tokenizer_config.json of the Qwen/Qwen3-* models, no tools):
// ChatML without a default system message, and think blocks:
//   system (first only)  "<|im_start|>system\n{content}<|im_end|>\n"
//   user                 "<|im_start|>user\n{content}<|im_end|>\n"
//   assistant            "<|im_start|>assistant\n{body}<|im_end|>\n"
// An assistant content holding "</think>" is split as the template does:
// reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n'),
// content = content.split('</think>')[-1].lstrip('\n'). Replies before the
// last user message keep only the content (past reasoning is dropped); after
// it, the last message and any reply with reasoning render
//   body = "<think>\n" + reasoning.strip('\n') + "\n</think>\n\n" + content.lstrip('\n')
// (so a plain final reply gets the empty block "<think>\n\n</think>\n\n"),
// others just the content. A system message after the first renders as a turn.
// Trained: the reply and <|im_end|>, and the think block when it holds
// reasoning; an empty think block is not trained (it is what the generation
// prompt supplies with enable_thinking false, so the model never learns to
// emit one).
std::string strip_chars(std::string_view s, bool left, bool right) {
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && s[b] == '\n') ++b;
  if (right)
    while (e > b && s[e - 1] == '\n') --e;
  return std::string(s.substr(b, e - b));
}

void render_qwen3(const Conversation& c, Out& out) {
  size_t last_query = c.size() - 1;  // the template's ns.last_query_index
  for (size_t i = c.size(); i-- > 0;)
    if (c[i].role == Role::user) {
      last_query = i;
      break;
    }
  for (size_t i = 0; i < c.size(); ++i) {
    const Message& m = c[i];
    if (m.role == Role::system && i == 0) {
      out.special("<|im_start|>", false);
      out.text("system\n" + m.content, false);
      out.special("<|im_end|>", false);
      out.text("\n", false);
      continue;
    }
    if (m.role != Role::assistant) {
      out.special("<|im_start|>", false);
      out.text(std::string(role_name(m.role)) + "\n" + m.user_text(), false);
      out.special("<|im_end|>", false);
      out.text("\n", false);
      continue;
    }
    std::string content = m.content, reasoning;
    constexpr std::string_view kClose = "</think>", kOpen = "<think>";
    if (const size_t first_close = content.find(kClose); first_close != std::string::npos) {
      std::string before = strip_chars(std::string_view(content).substr(0, first_close), false, true);
      if (const size_t open = before.rfind(kOpen); open != std::string::npos) before = before.substr(open + kOpen.size());
      reasoning = strip_chars(before, true, false);
      content = strip_chars(std::string_view(content).substr(content.rfind(kClose) + kClose.size()), true, false);
    }
    out.special("<|im_start|>", false);
    out.text("assistant\n", false);
    if (i > last_query && (i + 1 == c.size() || !reasoning.empty())) {
      const std::string r = strip_chars(reasoning, true, true);
      out.text("<think>\n" + r + "\n</think>\n\n", !r.empty());
      content = strip_chars(content, true, false);
    }
    out.text(content, true);
    out.special("<|im_end|>", true);
    out.text("\n", false);
  }
}

// ---- Alpaca -----------------------------------------------------------------
// Stanford Alpaca's training prompt (tatsu-lab/stanford_alpaca train.py
// PROMPT_DICT) as it appears in the "text" field of the tatsu-lab/alpaca data
// (fixtures/datasets/alpaca/torchtune_alpaca_tiny.json, checked by a test):
//   "Below is an instruction that describes a task[, paired with an input that provides
//   further context]. Write a response that appropriately completes the request.\n\n"
//   "### Instruction:\n{instruction}\n\n[### Input:\n{input}\n\n]### Response:\n{output}" + EOS
// The ", paired with an input..." preamble is used when the first turn has an
// input. A system message replaces the preamble sentence(s). Further turns
// (multi-turn alpaca records) follow after "\n\n". Trained: output + EOS.
void render_alpaca(const Conversation& c, const TemplateOptions& o, Out& out) {
  if (o.eos_token.empty())
    fail("chat template alpaca needs the tokenizer's EOS token (TemplateOptions::eos_token)");
  size_t i = 0;
  std::string preamble;
  if (!c.empty() && c[0].role == Role::system) {
    preamble = c[0].content;
    i = 1;
  } else {
    const bool input = i < c.size() && !c[i].input.empty();
    preamble =
        input ? "Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request."
              : "Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.";
  }
  out.text(preamble + "\n\n", false);
  bool first = true;
  for (; i < c.size(); ++i) {
    const Message& m = c[i];
    if (m.role == Role::assistant) {
      out.text(m.content, true);
      out.special(o.eos_token, true);
      continue;
    }
    if (m.role == Role::system)
      fail("chat template alpaca: a system message is only allowed first (message ", i, ")");
    std::string p = first ? "" : "\n\n";
    p += "### Instruction:\n" + m.content + "\n\n";
    if (!m.input.empty()) p += "### Input:\n" + m.input + "\n\n";
    p += "### Response:\n";
    out.text(p, false);
    first = false;
  }
}

// ---- none -------------------------------------------------------------------
// No template: message contents concatenated as they are (prompt_completion
// data becomes prompt + completion), with EOS after each assistant turn.
void render_none(const Conversation& c, const TemplateOptions& o, Out& out) {
  if (o.eos_token.empty())
    fail("chat template none needs the tokenizer's EOS token (TemplateOptions::eos_token)");
  for (const Message& m : c) {
    const bool asst = m.role == Role::assistant;
    out.text(m.user_text(), asst);
    if (asst) out.special(o.eos_token, true);
  }
}

}  // namespace

std::vector<std::string> ChatTemplate::names() {
  std::vector<std::string> v;
  for (size_t i = 0; i < kCanonicalNames; ++i) v.emplace_back(kNames[i].name);
  return v;
}

std::string ChatTemplate::name_of(Kind k) {
  for (const auto& e : kNames)
    if (e.kind == k) return e.name;
  return "?";
}

ChatTemplate ChatTemplate::named(std::string_view name, TemplateOptions options) {
  if (name == "qwen3-nothink") options.enable_thinking = false;
  for (const auto& e : kNames)
    if (name == e.name) return ChatTemplate(e.kind, std::move(options));
  fail("unknown chat template '", name, "'; supported: auto, ", joined_names());
}

std::optional<ChatTemplate::Kind> ChatTemplate::detect(std::string_view j) {
  // Markers are strings the template must emit, so they survive reformatting
  // of the Jinja around them; the order goes from the most specific.
  if (contains(j, "<|start_header_id|>") && contains(j, "<|eot_id|>"))
    return contains(j, "Cutting Knowledge Date") ? Kind::llama31 : Kind::llama3;
  if (contains(j, "<|im_start|>") && contains(j, "<|im_end|>"))
    return contains(j, "<think>") && contains(j, "last_query_index") ? Kind::qwen3
           : contains(j, "You are Qwen")                              ? Kind::qwen25
           : contains(j, "named SmolLM") ? Kind::smollm2
                                         : Kind::chatml;
  if (contains(j, "[INST]")) {
    if (contains(j, "<<SYS>>")) return Kind::llama2;
    // How each generation quotes its user wrapper (see render_mistral).
    if (contains(j, "' [INST] '") && contains(j, "' [/INST]'")) return Kind::mistral_v1;
    if (contains(j, "'[INST] '") && contains(j, "'[/INST]'")) return Kind::mistral_v3;
    if (contains(j, "\"[INST]\" +") && contains(j, "\"[/INST]\"")) return Kind::mistral_nemo;
  }
  return std::nullopt;
}

ChatTemplate ChatTemplate::resolve(std::string_view name, const std::optional<std::string>& jinja,
                                   TemplateOptions options) {
  if (name != "auto") return named(name, std::move(options));
  if (!jinja || jinja->empty())
    fail("chat_template: auto: the tokenizer has no chat_template in tokenizer_config.json; name one of: ",
         joined_names());
  if (auto k = detect(*jinja)) return ChatTemplate(*k, std::move(options));
  fail(
      "chat_template: auto: the tokenizer's chat_template is not one we support (we recognize Llama 3/3.1+, "
      "Llama 2, Mistral v1/v3/Nemo, ChatML/Qwen2.5/Qwen3/SmolLM2); name one of: ",
      joined_names());
}

bool ChatTemplate::renders_bos() const {
  switch (kind_) {
    case Kind::llama3:
    case Kind::llama31:
    case Kind::llama2:
    case Kind::mistral_v1:
    case Kind::mistral_v3:
    case Kind::mistral_nemo:
      return true;
    default:
      return false;
  }
}

std::vector<Segment> ChatTemplate::render(const Conversation& c, bool add_generation_prompt) const {
  if (c.empty()) fail("chat template ", name(), ": empty conversation");
  Out out;
  switch (kind_) {
    case Kind::llama3:
      render_llama3(c, false, options_, out);
      break;
    case Kind::llama31:
      render_llama3(c, true, options_, out);
      break;
    case Kind::llama2:
      render_llama2(c, out);
      break;
    case Kind::mistral_v1:
    case Kind::mistral_v3:
    case Kind::mistral_nemo:
      render_mistral(c, kind_, out);
      break;
    case Kind::chatml:
      render_chatml(c, nullptr, out);
      break;
    case Kind::qwen25:
      render_chatml(c, kQwenSystem, out);
      break;
    case Kind::smollm2:
      render_chatml(c, kSmolLM2System, out);
      break;
    case Kind::qwen3:
      render_qwen3(c, out);
      break;
    case Kind::alpaca:
      render_alpaca(c, options_, out);
      break;
    case Kind::none:
      render_none(c, options_, out);
      break;
  }
  if (add_generation_prompt) {
    switch (kind_) {
      case Kind::llama3:
      case Kind::llama31:
        out.special("<|start_header_id|>", false);
        out.text("assistant", false);
        out.special("<|end_header_id|>", false);
        out.text("\n\n", false);
        break;
      case Kind::chatml:
      case Kind::qwen25:
      case Kind::smollm2:
        out.special("<|im_start|>", false);
        out.text("assistant\n", false);
        break;
      case Kind::qwen3:
        out.special("<|im_start|>", false);
        out.text("assistant\n", false);
        if (!options_.enable_thinking) out.text("<think>\n\n</think>\n\n", false);
        break;
      default:
        break;  // the [INST] families end a user turn with [/INST]; alpaca and none have no turn markers
    }
  }
  return out.take();
}

std::string ChatTemplate::render_text(const Conversation& c) const {
  std::string s;
  for (const auto& seg : render(c)) s += seg.text;
  return s;
}

}  // namespace qlora
