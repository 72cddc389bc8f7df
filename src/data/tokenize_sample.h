// One sample -> token ids and labels: the step between the chat template and
// packing. Labels follow the Hugging Face convention: unshifted (labels[i]
// belongs to input_ids[i]; the loss shifts), kIgnoreLabel on tokens that are
// not trained.
//
// Masking rules:
//  - conversation: tokens of trained segments (assistant replies and the token
//    that ends them) keep their id; the rest get kIgnoreLabel unless
//    train_on_inputs.
//  - text (continued pretraining): BOS (when the tokenizer adds one) + text +
//    EOS (append_eos), everything trained but the BOS.
//  - tokens: the given labels (all trained when absent; all when
//    train_on_inputs).
//  - labels[0] is always kIgnoreLabel: nothing in the sample predicts the first
//    token, and in a packed row a label there would make one document predict
//    the next.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "data/chat_template.h"
#include "data/dataset_reader.h"
#include "tokenizer/tokenizer.h"

namespace qlora {

constexpr int32_t kIgnoreLabel = -100;

struct TokenizedSample {
  std::vector<TokenId> input_ids;
  std::vector<int32_t> labels;  // same length as input_ids
};

struct TokenizeOptions {
  bool train_on_inputs = false;
  bool append_eos = true;  // text samples end with EOS, so the model learns where documents end
};

// The chat template for this tokenizer: name "auto" is detected from the
// tokenizer's chat_template; alpaca/none get the tokenizer's EOS text unless
// options.eos_token is set.
ChatTemplate template_for_tokenizer(const Tokenizer& tok, std::string_view name, TemplateOptions options = {});

// True when the tokenizer's own encode(text, add_special=true) starts with BOS
// (Llama 2/3 do; Qwen2 and SmolLM do not).
bool tokenizer_adds_bos(const Tokenizer& tok);

// Segments -> ids + labels. Each special_text segment becomes its single id
// (Error if the tokenizer lacks it: wrong template for this model). Runs of
// ordinary segments between special ones are encoded as one text, exactly as
// a tokenizer encodes the whole rendered string; a token spanning a trained /
// untrained boundary is trained. add_bos prepends the tokenizer's BOS.
TokenizedSample tokenize_segments(const Tokenizer& tok, const std::vector<Segment>& segments, bool add_bos,
                                  bool train_on_inputs);

// Any sample; errors are prefixed with sample.where.
TokenizedSample tokenize_sample(const Tokenizer& tok, const ChatTemplate& tmpl, const Sample& sample,
                                const TokenizeOptions& options);

}  // namespace qlora
