// A short greedy generation from a prompt rendered through the run's chat
// template: what `qlora run` prints before and after training (the demo's
// "did it learn?" at a glance).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

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
using MakeGenerator = std::function<std::unique_ptr<TokenGenerator>(int64_t max_seq)>;
std::string sample_reply(const MakeGenerator& make, const ModelConfig& cfg, const Tokenizer& tok,
                         const ChatTemplate& tmpl, const std::string& prompt, int64_t max_new);

}  // namespace qlora
