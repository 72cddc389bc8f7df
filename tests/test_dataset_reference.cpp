// Template + real tokenizer against reference tokenizations: axolotl's
// Llama-2-chat token ids and labels of fixtures/datasets/chat/
// axolotl_conversation.json, and the mask on the Llama 3 and SmolLM tokenizers.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "data/dataset_reader.h"
#include "data/tokenize_sample.h"
#include "testing.h"

namespace qlora {
namespace {

using nlohmann::json;

std::string trained_text(const Tokenizer& tok, const TokenizedSample& t) {
  std::vector<TokenId> ids;
  for (size_t i = 0; i < t.labels.size(); ++i)
    if (t.labels[i] != kIgnoreLabel) ids.push_back(t.input_ids[i]);
  return tok.decode(ids);
}

TEST(DatasetReference, Llama2ChatMatchesAxolotlTokenForToken) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto tok = Tokenizer::load(fx / "tokenizers/llama2-hf");
  ReadOptions o;
  o.format = DataFormat::sharegpt;
  auto r = read_dataset(fx / "datasets/chat/axolotl_conversation.json", o);
  ASSERT_EQ(r.samples.size(), 1u);
  Sample s = r.samples[0];
  // axolotl (through FastChat) inserts Llama 2's default system prompt.
  s.conversation.insert(s.conversation.begin(), Message{Role::system, kLlama2DefaultSystemPrompt, {}});
  const auto out = tokenize_sample(*tok, template_for_tokenizer(*tok, "llama2"), s, {});

  const auto ref = json::parse(testing::read_bytes(fx / "datasets/chat/axolotl_conversation.tokenized_llama2chat.json"));
  const auto ids = ref["input_ids"].get<std::vector<int32_t>>();
  const auto labels = ref["labels"].get<std::vector<int32_t>>();
  size_t n = 0;
  for (const auto& m : ref["attention_mask"]) n += m.get<bool>();
  // The reference is padded to 4096, and ends with FastChat's separator
  // " </s><s>": its last <s> (trained there) is not part of the HF template.
  ASSERT_EQ(ids[n - 1], 1);
  ASSERT_EQ(out.input_ids.size(), n - 1);
  for (size_t i = 0; i + 1 < n; ++i) {
    ASSERT_EQ(out.input_ids[i], ids[i]) << "token " << i;
    ASSERT_EQ(out.labels[i], labels[i]) << "label " << i;
  }
}

TEST(DatasetReference, Llama3AndSmolLMTrainExactlyTheReplies) {
  QLORA_REQUIRE_FIXTURES(fx);
  const Conversation c = {Message{Role::system, "You are a contracts lawyer.", {}},
                          Message{Role::user, "Is a verbal agreement binding?", {}},
                          Message{Role::assistant, "Often, yes: most contracts need no writing.", {}},
                          Message{Role::user, "Which ones do?", {}},
                          Message{Role::assistant, "Land sales, for one.\n\nCheck your jurisdiction.", {}}};
  Sample s;
  s.conversation = c;
  {
    const auto tok = Tokenizer::load(fx / "tokenizers/llama3/assembled_hf");
    const auto t = template_for_tokenizer(*tok, "auto");
    EXPECT_EQ(t.name(), "llama3.1");
    const auto out = tokenize_sample(*tok, t, s, {});
    // The whole rendered string encodes to the same ids (one BOS, specials as single ids).
    EXPECT_EQ(out.input_ids, tok->encode(t.render_text(c), false));
    EXPECT_EQ(out.input_ids.front(), 128000);
    EXPECT_EQ(trained_text(*tok, out),
              "Often, yes: most contracts need no writing.<|eot_id|>Land sales, for one.\n\nCheck your "
              "jurisdiction.<|eot_id|>");
  }
  {
    const auto tok = Tokenizer::load(fx / "tokenizers/smollm-135m-instruct");
    const auto t = template_for_tokenizer(*tok, "auto");
    EXPECT_EQ(t.name(), "chatml");
    const auto out = tokenize_sample(*tok, t, s, {});
    EXPECT_EQ(out.input_ids, tok->encode(t.render_text(c), false));
    EXPECT_EQ(trained_text(*tok, out),
              "Often, yes: most contracts need no writing.<|im_end|>Land sales, for one.\n\nCheck your "
              "jurisdiction.<|im_end|>");
  }
}

}  // namespace
}  // namespace qlora
