// A short greedy generation from a prompt rendered through the run's chat
// template: what `qlora run` prints before and after training (the demo's
// "did it learn?" at a glance).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "data/chat_template.h"
#include "io/hf_config.h"
#include "model/token_generator.h"
#include "tokenizer/tokenizer.h"

namespace qlora {

// The prompt is a user message; the template's prompt part (everything before
// the assistant's reply, generation header included) is fed to the model,
// then up to max_new tokens are generated greedily, stopping at EOS, on a
// generator from `make` (asked for prompt + max_new tokens; it may hold fewer:
// the reply stops at its capacity()). Returns the decoded reply.
// The ids the template puts before an assistant reply to `prompt` (a user
// message, after `system` when that is not empty): the prompt part of a
// rendered conversation, generation header included, as the tokenizer
// encodes it for training. Empty when the template renders nothing before it.
std::vector<int32_t> chat_prompt_ids(const Tokenizer& tok, const ChatTemplate& tmpl,
                                     const std::string& prompt, const std::string& system = {});
// The same for a whole conversation ending with a user message (a chat's
// history): every earlier turn as the template renders it, then the header
// of the next assistant reply. Equals the overload above for [system,] user.
std::vector<int32_t> chat_prompt_ids(const Tokenizer& tok, const ChatTemplate& tmpl,
                                     const Conversation& history);

// The sample replies of a run, kept in its folder (samples.json) so that the
// report of a resumed run still shows the answers from before training.
struct SampleReplies {
  std::vector<std::string> prompts, before, after;  // before/after: empty or one per prompt
};
void save_sample_replies(const std::filesystem::path& run_dir, const SampleReplies& s);
// Empty when the file is absent or unreadable (the report then has no samples).
SampleReplies load_sample_replies(const std::filesystem::path& run_dir);

using MakeGenerator = std::function<std::unique_ptr<TokenGenerator>(int64_t max_seq)>;
std::string sample_reply(const MakeGenerator& make, const ModelConfig& cfg, const Tokenizer& tok,
                         const ChatTemplate& tmpl, const std::string& prompt, int64_t max_new);

}  // namespace qlora
