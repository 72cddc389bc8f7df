// Samples -> ids + labels, checked token by token on small examples with a
// word-level stand-in tokenizer (the real tokenizers are checked against
// reference tokenizations in test_dataset_reference.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "core/error.h"
#include "data/prepare.h"
#include "data/tokenize_sample.h"

namespace qlora {
namespace {

// Splits text into special tokens, newline runs, " word" pieces (a space
// joins the word after it, as in SentencePiece and GPT-2 BPE) and lone
// spaces. Ids of ordinary pieces are handed out on first sight.
class WordTokenizer : public Tokenizer {
 public:
  WordTokenizer(bool adds_bos, std::vector<std::string> specials) : adds_bos_(adds_bos) {
    for (auto& s : specials) {
      const TokenId id = static_cast<TokenId>(pieces_.size());
      ids_[s] = id;
      pieces_.push_back(s);
      special_.push_back(s);
    }
  }
  std::vector<TokenId> encode(std::string_view text, bool add_special) const override {
    std::vector<TokenId> out;
    if (add_special && adds_bos_) out.push_back(*bos_id());
    size_t i = 0;
    while (i < text.size()) {
      size_t len = 0;
      for (const auto& s : special_)
        if (text.substr(i, s.size()) == s) len = s.size();
      if (len == 0) {
        if (text[i] == '\n') {
          while (i + len < text.size() && text[i + len] == '\n') ++len;
        } else {
          len = text[i] == ' ' ? 1 : 0;
          while (i + len < text.size() && text[i + len] != ' ' && text[i + len] != '\n' && !special_at(text, i + len))
            ++len;
          len = std::max<size_t>(len, 1);
        }
      }
      out.push_back(intern(std::string(text.substr(i, len))));
      i += len;
    }
    return out;
  }
  std::string decode(const std::vector<TokenId>& ids, bool) const override {
    std::string s;
    for (TokenId id : ids) s += piece(id);
    return s;
  }
  std::string piece(TokenId id) const override {
    std::lock_guard lock(mu_);
    return pieces_.at(static_cast<size_t>(id));
  }
  std::optional<TokenId> token_id(std::string_view p) const override {
    std::lock_guard lock(mu_);
    const auto it = ids_.find(std::string(p));
    if (it == ids_.end()) return std::nullopt;
    return it->second;
  }
  int64_t vocab_size() const override { return 1000; }
  std::optional<TokenId> bos_id() const override { return token_id("<s>"); }
  std::optional<TokenId> eos_id() const override { return token_id("</s>"); }
  bool is_special(TokenId id) const override { return static_cast<size_t>(id) < special_.size(); }
  std::optional<std::string> chat_template() const override { return template_; }
  std::optional<std::string> template_;

 private:
  // Special tokens are matched before anything else, as real tokenizers do.
  bool special_at(std::string_view text, size_t i) const {
    for (const auto& s : special_)
      if (text.substr(i, s.size()) == s) return true;
    return false;
  }
  TokenId intern(const std::string& p) const {
    std::lock_guard lock(mu_);
    const auto it = ids_.find(p);
    if (it != ids_.end()) return it->second;
    const TokenId id = static_cast<TokenId>(pieces_.size());
    ids_[p] = id;
    pieces_.push_back(p);
    return id;
  }
  bool adds_bos_;
  std::vector<std::string> special_;
  mutable std::mutex mu_;
  mutable std::map<std::string, TokenId> ids_;
  mutable std::vector<std::string> pieces_;
};

const std::vector<std::string> kSpecials = {"<s>",         "</s>",         "<|begin_of_text|>", "<|start_header_id|>",
                                            "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",      "<|im_end|>"};

Message msg(Role r, std::string content) { return Message{r, std::move(content), {}}; }

// "piece" for untrained tokens, "+piece" for trained ones (label == id).
std::vector<std::string> marked(const Tokenizer& tok, const TokenizedSample& t) {
  EXPECT_EQ(t.input_ids.size(), t.labels.size());
  std::vector<std::string> v;
  for (size_t i = 0; i < t.input_ids.size(); ++i) {
    if (t.labels[i] != kIgnoreLabel) {
      EXPECT_EQ(t.labels[i], t.input_ids[i]) << i;
    }
    v.push_back((t.labels[i] == kIgnoreLabel ? "" : "+") + tok.piece(t.input_ids[i]));
  }
  return v;
}

Sample conversation(Conversation c) {
  Sample s;
  s.conversation = std::move(c);
  s.where = "test.jsonl:1";
  return s;
}

TEST(DatasetTokenize, Llama3MasksEverythingButRepliesAndEot) {
  const WordTokenizer tok(true, kSpecials);
  const auto t = ChatTemplate::named("llama3");
  const auto s = conversation({msg(Role::user, "Hello there!"), msg(Role::assistant, "Hi. Bye"),
                               msg(Role::user, "Again?"), msg(Role::assistant, "Yes")});
  const auto out = tokenize_sample(tok, t, s, {});
  // The template writes <|begin_of_text|> itself: no second BOS.
  const std::vector<std::string> want = {
      "<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n\n", "Hello", " there!",
      "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n", "+Hi.", "+ Bye", "+<|eot_id|>",
      "<|start_header_id|>", "user", "<|end_header_id|>", "\n\n", "Again?", "<|eot_id|>", "<|start_header_id|>",
      "assistant", "<|end_header_id|>", "\n\n", "+Yes", "+<|eot_id|>"};
  EXPECT_EQ(marked(tok, out), want);

  TokenizeOptions all;
  all.train_on_inputs = true;
  const auto everything = tokenize_sample(tok, t, s, all);
  EXPECT_EQ(everything.input_ids, out.input_ids);
  EXPECT_EQ(everything.labels[0], kIgnoreLabel);  // nothing predicts the first token
  for (size_t i = 1; i < everything.labels.size(); ++i) EXPECT_EQ(everything.labels[i], everything.input_ids[i]);
}

TEST(DatasetTokenize, ChatMLWithoutBosAndAlpacaWithTokenizerBosAndEos) {
  const WordTokenizer no_bos(false, kSpecials);
  auto out = tokenize_sample(no_bos, ChatTemplate::named("chatml"),
                             conversation({msg(Role::user, "Q"), msg(Role::assistant, "A b")}), {});
  EXPECT_EQ(marked(no_bos, out), (std::vector<std::string>{"<|im_start|>", "user", "\n", "Q", "<|im_end|>", "\n",
                                                           "<|im_start|>", "assistant", "\n", "+A", "+ b",
                                                           "+<|im_end|>", "\n"}));

  // Alpaca belongs to no model: BOS and EOS come from the tokenizer.
  const WordTokenizer bos(true, kSpecials);
  const auto alpaca = template_for_tokenizer(bos, "alpaca");
  EXPECT_EQ(alpaca.options().eos_token, "</s>");
  out = tokenize_sample(bos, alpaca, conversation({Message{Role::user, "Sum.", "1 2"}, msg(Role::assistant, "3")}), {});
  const auto m = marked(bos, out);
  ASSERT_GE(m.size(), 4u);
  EXPECT_EQ(m.front(), "<s>");
  EXPECT_EQ(std::vector<std::string>(m.end() - 3, m.end()), (std::vector<std::string>{"\n", "+3", "+</s>"}));
  for (size_t i = 0; i + 2 < m.size(); ++i) EXPECT_NE(m[i][0], '+') << i << " " << m[i];
}

TEST(DatasetTokenize, TokenAcrossTheReplyBoundaryIsTrained) {
  // Prompt "ab" and reply "cd" tokenize as one piece "abcd" when run together,
  // exactly as a real tokenizer sees the rendered string.
  const WordTokenizer tok(false, kSpecials);
  const auto t = template_for_tokenizer(tok, "none");
  const auto out = tokenize_sample(tok, t, conversation({msg(Role::user, "x ab"), msg(Role::assistant, "cd e")}), {});
  EXPECT_EQ(marked(tok, out), (std::vector<std::string>{"x", "+ abcd", "+ e", "+</s>"}));
  // Segments tokenized together equal the whole rendered text tokenized at once.
  EXPECT_EQ(out.input_ids, tok.encode(t.render_text(conversation({msg(Role::user, "x ab"),
                                                                 msg(Role::assistant, "cd e")}).conversation),
                                      false));
}

TEST(DatasetTokenize, TextAndTokensSamples) {
  const WordTokenizer tok(true, kSpecials);
  const auto t = ChatTemplate::named("llama3");
  Sample text;
  text.kind = Sample::Kind::text;
  text.text = "Some document.";
  auto out = tokenize_sample(tok, t, text, {});
  EXPECT_EQ(marked(tok, out), (std::vector<std::string>{"<s>", "+Some", "+ document.", "+</s>"}));
  TokenizeOptions no_eos;
  no_eos.append_eos = false;
  EXPECT_EQ(tokenize_sample(tok, t, text, no_eos).input_ids.size(), 3u);

  Sample ids;
  ids.kind = Sample::Kind::tokens;
  ids.input_ids = {1, 10, 11, 12};
  ids.labels = {1, -100, 11, 12};
  out = tokenize_sample(tok, t, ids, {});
  EXPECT_EQ(out.input_ids, ids.input_ids);
  EXPECT_EQ(out.labels, (std::vector<int32_t>{-100, -100, 11, 12}));
  TokenizeOptions all;
  all.train_on_inputs = true;
  EXPECT_EQ(tokenize_sample(tok, t, ids, all).labels, (std::vector<int32_t>{-100, 10, 11, 12}));
  ids.labels.clear();
  EXPECT_EQ(tokenize_sample(tok, t, ids, {}).labels, (std::vector<int32_t>{-100, 10, 11, 12}));
}

TEST(DatasetTokenize, ErrorsNameTheSample) {
  const WordTokenizer tok(true, {"<s>", "</s>"});
  auto s = conversation({msg(Role::user, "Q"), msg(Role::assistant, "A")});
  try {
    tokenize_sample(tok, ChatTemplate::named("llama3"), s, {});
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("test.jsonl:1: special token \"<|begin_of_text|>\""), std::string::npos) << m;
  }
  Sample ids;
  ids.kind = Sample::Kind::tokens;
  ids.input_ids = {1, 5000};
  ids.where = "t.jsonl:7";
  try {
    tokenize_sample(tok, ChatTemplate::named("llama3"), ids, {});
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("t.jsonl:7: input_ids[1] = 5000 is not below the vocabulary size 1000"),
              std::string::npos)
        << e.what();
  }
}

TEST(DatasetTokenize, AutoTemplateFromTheTokenizer) {
  WordTokenizer tok(false, kSpecials);
  tok.template_ = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>'}}";
  EXPECT_EQ(template_for_tokenizer(tok, "auto").name(), "chatml");
  tok.template_.reset();
  EXPECT_THROW(template_for_tokenizer(tok, "auto"), Error);
  EXPECT_FALSE(tokenizer_adds_bos(tok));
  EXPECT_TRUE(tokenizer_adds_bos(WordTokenizer(true, kSpecials)));
}

TEST(DatasetTokenize, ManyThreadsGiveTheSameResultAndTheEarliestError) {
  const WordTokenizer tok(true, kSpecials);
  const auto t = ChatTemplate::named("llama2");
  std::vector<Sample> samples;
  for (int i = 0; i < 300; ++i) {
    samples.push_back(conversation({msg(Role::user, "question " + std::to_string(i)),
                                    msg(Role::assistant, std::string(static_cast<size_t>(i % 7 + 1), 'a') + " end")}));
    samples.back().where = "d.jsonl:" + std::to_string(i + 1);
  }
  const auto one = tokenize_all(tok, t, samples, {}, 1);
  const auto many = tokenize_all(tok, t, samples, {}, 8);
  ASSERT_EQ(one.size(), 300u);
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_EQ(one[i].input_ids, many[i].input_ids) << i;
    EXPECT_EQ(one[i].labels, many[i].labels) << i;
  }
  // Two users in a row: llama2 refuses; the earliest bad sample is reported.
  samples[250].conversation.insert(samples[250].conversation.begin(), msg(Role::user, "x"));
  samples[40].conversation.insert(samples[40].conversation.begin(), msg(Role::user, "x"));
  for (unsigned threads : {1u, 8u}) {
    try {
      tokenize_all(tok, t, samples, {}, threads);
      ADD_FAILURE() << "expected an error";
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("d.jsonl:41: ", 0), 0u) << e.what();
    }
  }
}

TEST(DatasetTokenize, SeededShuffleAndValidationSplit) {
  const auto p = seeded_permutation(10, 42);
  EXPECT_EQ(p, seeded_permutation(10, 42));
  EXPECT_NE(p, seeded_permutation(10, 43));
  auto sorted = p;
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(sorted[i], i);
  std::vector<int> v = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  seeded_shuffle(v, 42);
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(static_cast<size_t>(v[i]), p[i]);

  const auto s = split_validation(100, 0.1, 7);
  EXPECT_EQ(s.val.size(), 10u);
  EXPECT_EQ(s.train.size(), 90u);
  std::vector<size_t> all = s.train;
  all.insert(all.end(), s.val.begin(), s.val.end());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i < 100; ++i) EXPECT_EQ(all[i], i);
  EXPECT_TRUE(std::is_sorted(s.val.begin(), s.val.end()));
  EXPECT_EQ(split_validation(100, 0.1, 7).val, s.val);
  EXPECT_EQ(split_validation(5, 0.01, 1).val.size(), 1u);  // a fraction > 0 holds out at least one
  EXPECT_EQ(split_validation(5, 0.0, 1).val.size(), 0u);
  EXPECT_EQ(split_validation(1, 0.5, 1).val.size(), 0u);  // never everything
  EXPECT_THROW(split_validation(5, 1.0, 1), Error);
}

}  // namespace
}  // namespace qlora
