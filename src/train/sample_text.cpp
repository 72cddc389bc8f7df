#include "train/sample_text.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/json_parse.h"
#include "data/tokenize_sample.h"
#include "kernels/ops.h"
#include "model/llama_generate.h"

namespace qlora {

void save_sample_replies(const std::filesystem::path& run_dir, const SampleReplies& s) {
  const nlohmann::json j = {{"prompts", s.prompts}, {"before", s.before}, {"after", s.after}};
  // Replies of an untrained model can be any bytes: invalid UTF-8 becomes U+FFFD.
  write_file_atomic(run_dir / "samples.json",
                    j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) + "\n");
}

SampleReplies load_sample_replies(const std::filesystem::path& run_dir) {
  SampleReplies s;
  std::ifstream in(run_dir / "samples.json");
  if (!in) return s;
  try {
    const nlohmann::json j = parse_json(in, (run_dir / "samples.json").string());
    s.prompts = j.at("prompts").get<std::vector<std::string>>();
    s.before = j.at("before").get<std::vector<std::string>>();
    s.after = j.at("after").get<std::vector<std::string>>();
  } catch (const std::exception&) {  // json::exception, or Error for a too deep file
    return {};  // a damaged file costs the report its samples, not the run
  }
  return s;
}

std::vector<int32_t> chat_prompt_ids(const Tokenizer& tok, const ChatTemplate& tmpl,
                                     const std::string& prompt, const std::string& system) {
  Conversation c;
  if (!system.empty()) c.push_back({Role::system, system, {}});
  c.push_back({Role::user, prompt, {}});
  return chat_prompt_ids(tok, tmpl, c);
}

std::vector<int32_t> chat_prompt_ids(const Tokenizer& tok, const ChatTemplate& tmpl,
                                     const Conversation& history) {
  if (history.empty() || history.back().role != Role::user)
    fail("chat prompt: the conversation must end with a user message");
  // Render the history with a placeholder reply and keep what comes before
  // that reply's trained tokens: exactly what the template puts before an
  // assistant turn (earlier replies are trained too, so the cut is at the
  // start of the last trained run).
  Sample sample;
  sample.conversation = history;
  sample.conversation.push_back({Role::assistant, "x", {}});
  sample.where = "chat prompt";
  const TokenizedSample s = tokenize_sample(tok, tmpl, sample, {});
  size_t end = s.labels.size();
  while (end > 0 && s.labels[end - 1] == ops::kIgnoreIndex) --end;  // untrained text after the reply
  while (end > 0 && s.labels[end - 1] != ops::kIgnoreIndex) --end;  // the reply itself
  return std::vector<int32_t>(s.input_ids.begin(), s.input_ids.begin() + std::ptrdiff_t(end));
}

std::string sample_reply(const MakeGenerator& make, const ModelConfig& cfg, const Tokenizer& tok,
                         const ChatTemplate& tmpl, const std::string& prompt, int64_t max_new) {
  const std::vector<int32_t> ids = chat_prompt_ids(tok, tmpl, prompt);
  if (ids.empty()) return {};

  int64_t total = std::min<int64_t>(int64_t(ids.size()) + max_new, cfg.max_position_embeddings);
  if (total <= int64_t(ids.size())) return {};
  const std::unique_ptr<TokenGenerator> gen = make(total);
  total = std::min(total, gen->capacity());
  if (total <= int64_t(ids.size())) return {};
  std::vector<float> logits(static_cast<size_t>(cfg.vocab_size));
  gen->feed(ids.data(), int64_t(ids.size()), logits.data());
  std::mt19937_64 rng(0);
  std::vector<int32_t> out;
  const auto& eos = cfg.eos_token_ids;
  const auto tok_eos = tok.eos_id();
  for (int64_t n = int64_t(ids.size()); n < total; ++n) {
    const int32_t id = sample_token(logits.data(), cfg.vocab_size, {}, rng);
    if (std::find(eos.begin(), eos.end(), id) != eos.end() || (tok_eos && *tok_eos == id)) break;
    out.push_back(id);
    if (n + 1 < total) gen->feed(&id, 1, logits.data());
  }
  return tok.decode(out, /*skip_special=*/true);
}

}  // namespace qlora
