// A short greedy generation from a prompt rendered through the run's chat
// template: what `qlora run` prints before and after training (the demo's
// "did it learn?" at a glance).
#pragma once

#include <cstdint>
#include <string>

#include "data/chat_template.h"
#include "model/lora.h"
#include "model/weights.h"
#include "tokenizer/tokenizer.h"

namespace qlora {

// The prompt is a user message; the template's prompt part (everything before
// the assistant's reply, generation header included) is fed to the model,
// then up to max_new tokens are generated greedily, stopping at EOS. Returns
// the decoded reply.
std::string sample_reply(const LlamaWeights& w, const LoraWeights* lora, const Tokenizer& tok,
                         const ChatTemplate& tmpl, const std::string& prompt, int64_t max_new);

}  // namespace qlora
