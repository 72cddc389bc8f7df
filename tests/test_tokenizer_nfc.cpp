// Qwen2-style NFC normalization (through ICU) and the per-thread BPE caches:
// decomposed text tokenizes as its composed form; caches never leak results
// between tokenizers, nor change results when they fill and start over.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "testing.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode_bytes.h"

namespace qlora {
namespace {

using testing::ScratchDir;

// Qwen2's pre-tokenizer regex, verbatim from its tokenizer.json.
constexpr const char* kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// A tiny byte-level tokenizer in Qwen2's layout: ids 0-255 are the bytes (in
// byte order), then one id per merge in `merges` (raw byte strings).
std::unique_ptr<Tokenizer> byte_level_tokenizer(const ScratchDir& dir, const std::string& name,
                                                const std::vector<std::pair<std::string, std::string>>& merges,
                                                bool nfc) {
  const auto& table = tok::ByteLevelTable::get();
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[table.encode(static_cast<uint8_t>(b))] = b;
  nlohmann::json m = nlohmann::json::array();
  int next = 256;
  for (const auto& [a, b] : merges) {
    m.push_back({table.encode(a), table.encode(b)});
    vocab[table.encode(a + b)] = next++;
  }
  nlohmann::json j = {
      {"normalizer", nfc ? nlohmann::json{{"type", "NFC"}} : nlohmann::json()},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"}, {"pattern", {{"Regex", kQwen2Pattern}}}, {"behavior", "Isolated"}, {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", m}}}};
  const auto folder = dir / name;
  std::filesystem::create_directories(folder);
  testing::write_bytes(folder / "tokenizer.json", j.dump());
  return Tokenizer::load(folder);
}

TEST(TokenizerNfc, DecomposedTextTokenizesAsComposed) {
  ScratchDir d;
  // "é" is C3 A9, "Å" C3 85, "가" EA B0 80: one token each after merging.
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"\xC3", "\xA9"}, {"\xC3", "\x85"}, {"\xEA", "\xB0"}, {"\xEA\xB0", "\x80"}};
  const auto nfc = byte_level_tokenizer(d, "nfc", merges, true);
  const auto raw = byte_level_tokenizer(d, "raw", merges, false);
  const TokenId e_acute = 256, a_ring = 257, ga = 259;

  EXPECT_EQ(nfc->encode("\u00e9", false), (std::vector<TokenId>{e_acute}));
  EXPECT_EQ(nfc->encode("e\u0301", false), (std::vector<TokenId>{e_acute}));  // e + combining acute
  EXPECT_EQ(nfc->encode("cafe\u0301", false), nfc->encode("caf\u00e9", false));
  EXPECT_EQ(nfc->encode("A\u030A", false), (std::vector<TokenId>{a_ring}));    // A + combining ring
  EXPECT_EQ(nfc->encode("\u212B", false), (std::vector<TokenId>{a_ring}));     // Angstrom sign: a singleton
  EXPECT_EQ(nfc->encode("\u1100\u1161", false), (std::vector<TokenId>{ga}));  // Hangul jamo compose
  EXPECT_EQ(nfc->decode(nfc->encode("cafe\u0301 au lait", false)), "caf\u00e9 au lait");
  // Without the normalizer the combining mark stays a piece of its own.
  EXPECT_EQ(raw->encode("e\u0301", false), (std::vector<TokenId>{'e', 0xCC, 0x81}));
  // Invalid bytes around a decomposed run pass through as bytes.
  EXPECT_EQ(nfc->encode("\xFF" "e\u0301\xFE", false), (std::vector<TokenId>{0xFF, e_acute, 0xFE}));
  // Text below U+0300 and already composed text are unchanged.
  const std::string plain = "Plain ASCII, Latin-1 \u00e9\u00e8 and CJK \u4f60\u597d";
  EXPECT_EQ(nfc->decode(nfc->encode(plain, false)), plain);
  EXPECT_EQ(nfc->encode(plain, false), raw->encode(plain, false));
}

// Two tokenizers used alternately from one thread, and a tokenizer made
// after another one was destroyed, each give their own ids: the per-thread
// caches belong to one tokenizer at a time.
TEST(TokenizerNfc, ThreadCachesFollowTheTokenizer) {
  ScratchDir d;
  const auto with = byte_level_tokenizer(d, "with", {{"a", "b"}}, false);
  const auto without = byte_level_tokenizer(d, "without", {}, false);
  for (int round = 0; round < 3; ++round) {
    EXPECT_EQ(with->encode("ab ab", false), (std::vector<TokenId>{256, ' ', 256}));
    EXPECT_EQ(without->encode("ab ab", false), (std::vector<TokenId>{'a', 'b', ' ', 'a', 'b'}));
  }
  for (int i = 0; i < 3; ++i) {
    auto first = byte_level_tokenizer(d, "first" + std::to_string(i), {{"a", "b"}}, false);
    EXPECT_EQ(first->encode("ab", false), (std::vector<TokenId>{256}));
    first.reset();  // the next one may well reuse its address
    const auto second = byte_level_tokenizer(d, "second" + std::to_string(i), {{"b", "c"}}, false);
    EXPECT_EQ(second->encode("ab", false), (std::vector<TokenId>{'a', 'b'}));
    EXPECT_EQ(second->encode("abc", false), (std::vector<TokenId>{'a', 256}));
  }
}

// Far more distinct words than the word cache holds, twice in one thread
// (the cache fills, starts over, and serves repeats) and once in a fresh
// thread in the other order: every document gets the same ids.
TEST(TokenizerNfc, WordCacheRefillKeepsResults) {
  ScratchDir d;
  std::vector<std::pair<std::string, std::string>> merges;
  for (char a = 'a'; a <= 'h'; ++a)
    for (char b = 'a'; b <= 'h'; ++b) merges.push_back({std::string(1, a), std::string(1, b)});
  merges.push_back({"ab", "cd"});
  merges.push_back({"abcd", "ef"});
  const auto tk = byte_level_tokenizer(d, "t", merges, false);
  std::mt19937 rng(7);
  std::vector<std::string> docs(200);
  for (auto& doc : docs)
    for (int w = 0; w < 200; ++w) {
      doc += ' ';
      const int len = 1 + int(rng() % 9);
      for (int k = 0; k < len; ++k) doc += char('a' + rng() % 8);
    }
  std::vector<std::vector<TokenId>> first, second(docs.size()), fresh(docs.size());
  for (const auto& doc : docs) first.push_back(tk->encode(doc, false));
  for (size_t i = 0; i < docs.size(); ++i) second[i] = tk->encode(docs[i], false);
  std::thread([&] {
    for (size_t i = docs.size(); i-- > 0;) fresh[i] = tk->encode(docs[i], false);
  }).join();
  EXPECT_EQ(first, second);
  EXPECT_EQ(first, fresh);
  // And the ids are right: "abcdef" is one token, decode gives the text back.
  EXPECT_EQ(tk->encode("abcdef", false).size(), 1u);
  for (size_t i = 0; i < docs.size(); i += 37) EXPECT_EQ(tk->decode(first[i]), docs[i]);
}

}  // namespace
}  // namespace qlora
