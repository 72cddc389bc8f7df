// Tokenizer loading, special tokens, round trips and error messages:
// stories260K's reference ids, SmolLM (byte-level BPE with Digits), the
// SentencePiece path (Llama 2, Mistral v1/v3), invalid UTF-8, bad files.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "testing.h"
#include "tokenizer/tokenizer.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::ScratchDir;

const std::vector<std::string>& sample_texts() {
  static const std::vector<std::string> texts = {
      "",
      "Hello world",
      "  leading spaces and trailing   ",
      "The patient's BP was 120/80 mmHg on 2024-03-01.\n\n\tTabbed line\r\n",
      "Numbers 1234567890 and 3.14159",
      "Ünïcödé: 你好，世界! Привет мир. 🦙🚀 ✅",
      "Code: for (int i = 0; i < n; ++i) { x[i] += y[i]; }",
  };
  return texts;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Tokenizer, Stories260kEncodesReferenceText) {
  QLORA_REQUIRE_FIXTURES(fx);
  const fs::path dir = fx / "models/stories260K/hf";
  const auto ref = nlohmann::json::parse(testing::read_bytes(dir / "expected_greedy_200.json"));
  const auto ids = ref.at("greedy_ids").get<std::vector<TokenId>>();
  const auto text = ref.at("decoded_text").get<std::string>();
  for (const fs::path& p : {dir / "tokenizer.json", dir / "tokenizer.model"}) {
    SCOPED_TRACE(p.string());
    const auto tk = Tokenizer::load(p);
    EXPECT_EQ(tk->encode(text, false), ids);
    auto with_bos = ref.at("prompt_ids").get<std::vector<TokenId>>();
    with_bos.insert(with_bos.end(), ids.begin(), ids.end());
    EXPECT_EQ(tk->encode(text, true), with_bos);
    EXPECT_EQ(tk->decode(ids), text);
    EXPECT_EQ(tk->decode(with_bos, /*skip_special=*/true), text);
    EXPECT_EQ(tk->bos_id(), 1);
    EXPECT_EQ(tk->eos_id(), 2);
    EXPECT_EQ(tk->vocab_size(), 512);
  }
}

TEST(Tokenizer, SmolLmLoadsAndRoundTrips) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto tk = Tokenizer::load(fx / "tokenizers/smollm-135m-instruct");
  EXPECT_EQ(tk->vocab_size(), 49152);
  for (const auto& s : sample_texts()) EXPECT_EQ(tk->decode(tk->encode(s, false)), s);
  // Digits(individual_digits): every digit is its own token.
  EXPECT_EQ(tk->encode("12345", false).size(), 5u);
  // Special tokens in the text are matched whole; no post-processor, so
  // add_special adds nothing.
  const auto ids = tk->encode("<|im_start|>user\nHi<|im_end|>", true);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(ids.back(), 2);
  EXPECT_TRUE(tk->is_special(1));
  EXPECT_EQ(tk->piece(tk->encode(" the", false).at(0)), "\xC4\xA0the");  // "Ġthe"
  EXPECT_EQ(tk->eos_id(), 2);
  ASSERT_TRUE(tk->chat_template().has_value());
  EXPECT_NE(tk->chat_template()->find("<|im_start|>"), std::string::npos);
  EXPECT_EQ(tk->decode(ids, /*skip_special=*/true), "user\nHi");
}

TEST(Tokenizer, Llama3SpecialTokens) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto tk = Tokenizer::load(fx / "tokenizers/llama3/assembled_hf");
  EXPECT_EQ(tk->vocab_size(), 128256);
  EXPECT_EQ(tk->bos_id(), 128000);
  EXPECT_EQ(tk->eos_id(), 128009);
  EXPECT_EQ(tk->encode("Hello", true), (std::vector<TokenId>{128000, 9906}));
  EXPECT_EQ(tk->encode("<|begin_of_text|>Hello<|eot_id|>", false), (std::vector<TokenId>{128000, 9906, 128009}));
  EXPECT_EQ(tk->token_id("<|eot_id|>"), 128009);
  EXPECT_EQ(tk->token_id("Hello"), 9906);
  EXPECT_FALSE(tk->token_id("no such piece at all").has_value());
  EXPECT_EQ(tk->decode({128000, 9906, 128009}), "<|begin_of_text|>Hello<|eot_id|>");
  EXPECT_EQ(tk->decode({128000, 9906, 128009}, true), "Hello");
  for (const auto& s : sample_texts()) EXPECT_EQ(tk->decode(tk->encode(s, false)), s);
}

TEST(Tokenizer, Llama2AddsBosAndMatchesSentencePiece) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto hf = Tokenizer::load(fx / "tokenizers/llama2-hf/tokenizer.json");
  const auto sp = Tokenizer::load(fx / "tokenizers/llama2-hf/tokenizer.model");
  EXPECT_EQ(hf->encode("Hello world", true), (std::vector<TokenId>{1, 15043, 3186}));
  EXPECT_EQ(sp->encode("Hello world", true), (std::vector<TokenId>{1, 15043, 3186}));
  EXPECT_EQ(hf->vocab_size(), 32000);
  EXPECT_EQ(sp->vocab_size(), 32000);
  EXPECT_EQ(sp->piece(15043), "\xE2\x96\x81Hello");
  EXPECT_EQ(sp->token_id("\xE2\x96\x81Hello"), 15043);
  EXPECT_TRUE(sp->is_special(1));
  EXPECT_FALSE(sp->is_special(15043));
  // The SentencePiece path matches control pieces in the text whole.
  EXPECT_EQ(sp->encode("<s>Hello", false), (std::vector<TokenId>{1, 15043}));
  for (const auto& s : sample_texts()) {
    const auto a = hf->encode(s, false);
    EXPECT_EQ(a, sp->encode(s, false)) << s;
    EXPECT_EQ(hf->decode(a), s);
    EXPECT_EQ(sp->decode(a), s);
  }
}

TEST(Tokenizer, MistralSentencePieceModels) {
  QLORA_REQUIRE_FIXTURES(fx);
  for (const char* name : {"tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3"}) {
    SCOPED_TRACE(name);
    const auto tk = Tokenizer::load(fx / "tokenizers/mistral" / name);
    EXPECT_EQ(tk->bos_id(), 1);
    EXPECT_EQ(tk->eos_id(), 2);
    EXPECT_GE(tk->vocab_size(), 32000);
    for (const auto& s : sample_texts()) EXPECT_EQ(tk->decode(tk->encode(s, false)), s);
    const auto ids = tk->encode("Hello", true);
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids.front(), 1);
    EXPECT_EQ(tk->decode(ids, true), "Hello");
  }
}

TEST(Tokenizer, InvalidUtf8NeverCrashesAndRoundTrips) {
  QLORA_REQUIRE_FIXTURES(fx);
  const std::string bad = std::string("ok \xFF\xFE bytes \xC3 end \xE2\x82") + std::string(1, '\0') + "z\xF0\x9F";
  for (const fs::path& p : {fx / "tokenizers/llama3/assembled_hf", fx / "tokenizers/llama2-hf/tokenizer.json"}) {
    SCOPED_TRACE(p.string());
    const auto tk = Tokenizer::load(p);
    const auto ids = tk->encode(bad, false);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(tk->decode(ids), bad);
  }
  // SmolLM's vocab lacks 21 byte symbols (0xF5-0xFF among them): like HF
  // (no unk token), such bytes are dropped; the others round-trip.
  const auto smol = Tokenizer::load(fx / "tokenizers/smollm-135m-instruct");
  const std::string smol_bad = "ok \xC3 end \xE2\x82 z\xF0\x9F";
  EXPECT_EQ(smol->decode(smol->encode(smol_bad, false)), smol_bad);
  EXPECT_EQ(smol->decode(smol->encode("a\xFF\xFE" "b", false)), "ab");
  // Llama 2: bytes that are no character go to <0xNN> byte tokens.
  const auto l2 = Tokenizer::load(fx / "tokenizers/llama2-hf/tokenizer.json");
  const auto ids = l2->encode("\xFF", false);
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(l2->piece(ids[1]), "<0xFF>");
  // SentencePiece must not crash either.
  const auto sp = Tokenizer::load(fx / "tokenizers/llama2-hf/tokenizer.model");
  EXPECT_FALSE(sp->encode(bad, false).empty());
}

TEST(Tokenizer, LongAndRandomInputs) {
  QLORA_REQUIRE_FIXTURES(fx);
  std::vector<std::string> inputs = {std::string(200000, ' '), std::string(200000, 'a'), std::string(100000, '\n'),
                                     std::string(200000, '7')};
  std::string cjk;
  for (int i = 0; i < 30000; ++i) cjk += "\xE6\xB3\x95";  // a 90 KB run of one CJK character
  inputs.push_back(cjk);
  std::string noise;
  uint32_t x = 12345;
  for (int i = 0; i < 100000; ++i) {
    x = x * 1664525u + 1013904223u;  // fixed LCG: random bytes, reproducible
    noise.push_back(static_cast<char>(x >> 24));
  }
  inputs.push_back(noise);
  for (const fs::path& p : {fx / "tokenizers/llama3/assembled_hf", fx / "tokenizers/llama2-hf/tokenizer.json"}) {
    const auto tk = Tokenizer::load(p);
    for (size_t i = 0; i < inputs.size(); ++i) {
      SCOPED_TRACE(p.string() + " input " + std::to_string(i));
      const auto ids = tk->encode(inputs[i], false);
      EXPECT_FALSE(ids.empty());
      EXPECT_TRUE(tk->decode(ids) == inputs[i]);
    }
  }
}

// A tokenizer.json in the newer Mistral/Llama style (Metaspace pre-tokenizer
// instead of the Prepend/Replace normalizer, byte fallback), built small so
// every id is known; NFC (Qwen2's normalizer) is accepted.
TEST(Tokenizer, MetaspaceByteFallbackSynthetic) {
  ScratchDir d;
  nlohmann::json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"\u2581", 3}, {"a", 4},
                          {"b", 5},     {"\u2581a", 6}, {"ab", 7}, {"\u2581ab", 8}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab[name] = 9 + b;
  }
  const nlohmann::json j = {
      {"added_tokens",
       {{{"id", 1}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
        {{"id", 2}, {"content", "</s>"}, {"special", true}, {"normalized", false}}}},
      {"normalizer", {{"type", "NFC"}}},
      {"pre_tokenizer", {{"type", "Metaspace"}, {"replacement", "\u2581"}, {"prepend_scheme", "first"}, {"split", true}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders", {{{"type", "Metaspace"}, {"prepend_scheme", "first"}}, {{"type", "ByteFallback"}}, {{"type", "Fuse"}}}}}},
      {"model",
       {{"type", "BPE"},
        {"byte_fallback", true},
        {"unk_token", "<unk>"},
        {"vocab", vocab},
        {"merges", nlohmann::json::array({nlohmann::json::array({"a", "b"}), nlohmann::json::array({"\u2581", "a"}),
                                          nlohmann::json::array({"\u2581", "ab"})})}}}};
  testing::write_bytes(d / "tokenizer.json", j.dump());
  const auto tk = Tokenizer::load(d.path());
  EXPECT_EQ(tk->encode("ab ab", false), (std::vector<TokenId>{8, 8}));
  EXPECT_EQ(tk->encode("abc", true), (std::vector<TokenId>{1, 8, 9 + 'c'}));
  EXPECT_EQ(tk->encode("ab</s>ab", false), (std::vector<TokenId>{8, 2, 7}));  // "first": no ▁ after a special
  EXPECT_EQ(tk->decode({1, 8, 9 + 'c'}, true), "abc");
  EXPECT_EQ(tk->decode(tk->encode("ab ba c", false)), "ab ba c");
  EXPECT_EQ(tk->bos_id(), 1);
  EXPECT_TRUE(tk->is_special(2));
}

TEST(Tokenizer, ErrorsNameTheFileAndCause) {
  ScratchDir d;
  EXPECT_NE(message_of([&] { Tokenizer::load(d / "nope"); }).find("nope"), std::string::npos);
  EXPECT_NE(message_of([&] { Tokenizer::load(d.path()); }).find("no tokenizer.json or tokenizer.model"),
            std::string::npos);

  testing::write_bytes(d / "tokenizer.json", "{\"model\": {\"type\": \"BPE\", ");
  const std::string malformed = message_of([&] { Tokenizer::load(d.path()); });
  EXPECT_NE(malformed.find("malformed JSON"), std::string::npos) << malformed;
  EXPECT_NE(malformed.find("tokenizer.json"), std::string::npos) << malformed;

  const auto with = [&](const std::string& model, const std::string& extra) {
    testing::write_bytes(d / "tokenizer.json", "{\"added_tokens\": [], " + extra + "\"model\": " + model + "}");
    return message_of([&] { Tokenizer::load(d.path()); });
  };
  const std::string bpe = R"({"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";
  const std::string wp = with(R"({"type": "WordPiece", "vocab": {"a": 0}})", "");
  EXPECT_NE(wp.find("unsupported tokenizer model type 'WordPiece'"), std::string::npos) << wp;
  EXPECT_NE(wp.find((d / "tokenizer.json").string()), std::string::npos) << wp;
  EXPECT_NE(with(bpe, R"("normalizer": {"type": "NFKD"}, )").find("unsupported normalizer type 'NFKD'"),
            std::string::npos);
  EXPECT_NE(with(bpe, R"("pre_tokenizer": {"type": "Whitespace"}, )").find("unsupported pre-tokenizer type 'Whitespace'"),
            std::string::npos);
  EXPECT_NE(with(bpe, R"("decoder": {"type": "WordPiece"}, )").find("unsupported decoder type 'WordPiece'"),
            std::string::npos);
  EXPECT_NE(with(bpe, R"("post_processor": {"type": "BertProcessing"}, )").find("unsupported post-processor"),
            std::string::npos);
  EXPECT_NE(with(R"({"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]})", "").find("missing from the vocab"),
            std::string::npos);

  EXPECT_NE(with(R"({"type": "BPE", "vocab": {"a": 2000000000}, "merges": []})", "")
                .find("vocab entry 'a' must be in [0, 4194303], got 2000000000"),
            std::string::npos);

  // A minimal valid file loads, and merges work in both forms.
  for (const std::string merges : {R"(["a b"])", R"([["a", "b"]])"}) {
    testing::write_bytes(d / "tokenizer.json",
                         R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": )" + merges + "}}");
    const auto tk = Tokenizer::load(d.path());
    EXPECT_EQ(tk->encode("abab", false), (std::vector<TokenId>{2, 2}));
  }

  testing::write_bytes(d / "bad.model", "this is not a sentencepiece model");
  EXPECT_NE(message_of([&] { Tokenizer::load(d / "bad.model"); }).find("bad.model"), std::string::npos);
}

// Every id in tokenizer.json is an integer in [0, kMaxVocabSize): a float
// such as 1.06e115 (found by fuzz_tokenizer_json) was cast to int32 out of
// range (undefined behaviour), a huge id sized the dense id tables.
TEST(Tokenizer, IdsInTokenizerJsonAreBoundedIntegers) {
  ScratchDir d;
  const auto error = [&](const std::string& body) {
    testing::write_bytes(d / "tokenizer.json", body);
    return message_of([&] { Tokenizer::load(d.path()); });
  };
  const auto with_vocab = [&](const std::string& id) {
    return error(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": )" + id + R"(}, "merges": []}})");
  };
  const std::string file = (d / "tokenizer.json").string();
  EXPECT_NE(with_vocab("1.06e115").find(file + ": vocab entry 'b' must be an integer, got number"),
            std::string::npos)
      << with_vocab("1.06e115");
  EXPECT_NE(with_vocab("1.0").find("vocab entry 'b' must be an integer"), std::string::npos);
  EXPECT_NE(with_vocab("-1").find("vocab entry 'b' must be in [0, 4194303], got -1"), std::string::npos);
  EXPECT_NE(with_vocab("4194304").find("vocab entry 'b' must be in [0, 4194303], got 4194304"),
            std::string::npos);
  EXPECT_NE(with_vocab("18446744073709551615").find("must be in [0, 4194303], got 18446744073709551615"),
            std::string::npos);
  const std::string model = R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []})";
  const std::string added = error(R"({"added_tokens": [{"id": 1e300, "content": "<s>"}], )" + model + "}");
  EXPECT_NE(added.find(file + ": added token '<s>' id must be an integer, got number"), std::string::npos)
      << added;
  const std::string post = error(
      R"({"post_processor": {"type": "TemplateProcessing", "single": [],
          "special_tokens": {"<s>": {"id": "<s>", "ids": [2.5e40]}}}, )" +
      model + "}");
  EXPECT_NE(post.find("post_processor special token '<s>' id must be an integer"), std::string::npos) << post;
  const std::string strip =
      error(R"({"decoder": {"type": "Strip", "content": " ", "start": 1e30, "stop": 0}, )" + model + "}");
  EXPECT_NE(strip.find("Strip decoder \"start\" must be an integer"), std::string::npos) << strip;
  // The largest id allowed loads.
  testing::write_bytes(d / "tokenizer.json",
                       R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 4194303}, "merges": []}})");
  EXPECT_EQ(Tokenizer::load(d.path())->vocab_size(), 4194304);
}

}  // namespace
}  // namespace qlora
