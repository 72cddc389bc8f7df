// builtin:tiny as a complete HF folder: its tokenizer loads through the
// project's own loader, agrees with config.json, round-trips any text, and is
// trained on the demo data it ships with (recipes/data).
#include <gtest/gtest.h>

#include <cctype>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "model/builtin.h"
#include "testing.h"
#include "tokenizer/tokenizer.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::ScratchDir;

nlohmann::json read_json(const fs::path& p) {
  return nlohmann::json::parse(testing::read_bytes(p));
}

struct QaRecord {
  std::string instruction, output;
};

std::vector<QaRecord> read_qa(const std::string& name) {
  const fs::path p = fs::path(QLORA_SOURCE_DIR) / "recipes" / "data" / name;
  std::ifstream in(p);
  EXPECT_TRUE(in) << p;
  std::vector<QaRecord> out;
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j.size(), 2u) << p << ": " << line;
    out.push_back({j.at("instruction").get<std::string>(), j.at("output").get<std::string>()});
  }
  return out;
}

// The alpaca rendering the demo recipe trains on (src/data/chat_template.cpp).
std::string alpaca_text(const QaRecord& r) {
  return "Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\n" +
         r.instruction + "\n\n### Response:\n" + r.output;
}

class BuiltinTiny : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new ScratchDir();
    write_builtin_model("tiny", dir_->path() / "tiny");
    tok_ = Tokenizer::load(dir_->path() / "tiny").release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete dir_;
  }
  static fs::path folder() { return dir_->path() / "tiny"; }
  static const Tokenizer& tok() { return *tok_; }

 private:
  static inline ScratchDir* dir_ = nullptr;
  static inline Tokenizer* tok_ = nullptr;
};

TEST_F(BuiltinTiny, FolderHasTokenizerFilesWithoutChatTemplate) {
  for (const char* f : {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                        "tokenizer_config.json", "special_tokens_map.json"})
    EXPECT_TRUE(fs::exists(folder() / f)) << f;
  const auto tc = read_json(folder() / "tokenizer_config.json");
  EXPECT_FALSE(tc.contains("chat_template"));
  EXPECT_FALSE(tok().chat_template().has_value());
}

TEST_F(BuiltinTiny, TokenizerAgreesWithConfig) {
  const auto cfg = read_json(folder() / "config.json");
  const auto vocab = cfg.at("vocab_size").get<int64_t>();
  EXPECT_EQ(tok().vocab_size(), vocab);
  ASSERT_TRUE(tok().bos_id().has_value());
  ASSERT_TRUE(tok().eos_id().has_value());
  EXPECT_EQ(*tok().bos_id(), cfg.at("bos_token_id").get<int>());
  EXPECT_EQ(*tok().eos_id(), cfg.at("eos_token_id").get<int>());
  const auto gen = read_json(folder() / "generation_config.json");
  EXPECT_EQ(*tok().eos_id(), gen.at("eos_token_id").get<int>());
  EXPECT_EQ(tok().token_id("<pad>"), std::optional<TokenId>(0));
  EXPECT_EQ(tok().piece(1), "<s>");
  EXPECT_EQ(tok().piece(2), "</s>");
  for (TokenId id : {0, 1, 2}) EXPECT_TRUE(tok().is_special(id)) << id;
  // Every id names a distinct entry, so no embedding row is unreachable.
  std::set<std::string> pieces;
  for (TokenId id = 0; id < vocab; ++id) pieces.insert(tok().piece(id));
  EXPECT_EQ(pieces.size(), size_t(vocab));
}

TEST_F(BuiltinTiny, RoundTripsAnyTextWithIdsInRange) {
  static constexpr char kRawBytes[] = "invalid UTF-8 \xff\xfe\x80 and a NUL \0 inside";
  const std::vector<std::string> texts = {
      "What is a lease?\n\nA lease is a contract in which a landlord lets a tenant use a property.",
      "Café, naïve résumé — “quoted” § 12(b) ½ 合同法 🙂",
      "  leading spaces, tabs\tand\r\nCRLF\n\n\n",
      "It's the tenant's right; they'll pay $1,250.00 on 2024-01-31.",
      std::string(kRawBytes, sizeof(kRawBytes) - 1),
      "",
  };
  for (const auto& t : texts) {
    const auto ids = tok().encode(t, /*add_special=*/false);
    for (TokenId id : ids) {
      EXPECT_GE(id, 0);
      EXPECT_LT(id, tok().vocab_size());
    }
    EXPECT_EQ(tok().decode(ids), t);
    const auto with_bos = tok().encode(t, /*add_special=*/true);
    ASSERT_EQ(with_bos.size(), ids.size() + 1);
    EXPECT_EQ(with_bos.front(), 1);
    EXPECT_EQ(tok().decode(with_bos, /*skip_special=*/true), t);
  }
}

TEST_F(BuiltinTiny, SpecialTokensInTextAreSingleIds) {
  const auto ids = tok().encode("<s>A lease is a contract.</s><pad>", false);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(ids[ids.size() - 2], 2);
  EXPECT_EQ(ids.back(), 0);
  EXPECT_EQ(tok().decode(ids, /*skip_special=*/true), "A lease is a contract.");
}

TEST_F(BuiltinTiny, MergesCompressTheDemoData) {
  // The merges were learned from this text: the alpaca prompt words and the
  // legal vocabulary are whole tokens, which keeps the CPU demo short.
  size_t bytes = 0, tokens = 0;
  for (const auto& r : read_qa("legal-qa.jsonl")) {
    const std::string t = alpaca_text(r);
    const auto ids = tok().encode(t, false);
    EXPECT_EQ(tok().decode(ids), t);
    bytes += t.size();
    tokens += ids.size();
  }
  ASSERT_GT(tokens, 0u);
  EXPECT_GT(double(bytes) / double(tokens), 3.0) << bytes << " bytes, " << tokens << " tokens";
  EXPECT_EQ(tok().encode(" Instruction", false).size(), 1u);
  EXPECT_EQ(tok().encode(" Response", false).size(), 1u);
}

TEST_F(BuiltinTiny, WritingIsDeterministic) {
  ScratchDir again;
  write_builtin_model("tiny", again / "tiny");
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"})
    EXPECT_EQ(testing::read_bytes(again / "tiny" / f), testing::read_bytes(folder() / f)) << f;
}

TEST(BuiltinDemoData, LegalQaIsShortConsistentAndDisjoint) {
  const auto train = read_qa("legal-qa.jsonl");
  const auto val = read_qa("legal-qa-val.jsonl");
  EXPECT_GE(train.size(), 250u);
  EXPECT_GE(val.size(), 25u);
  std::set<std::string> seen;
  for (const auto* set : {&train, &val})
    for (const auto& r : *set) {
      EXPECT_TRUE(seen.insert(r.instruction).second) << "repeated question: " << r.instruction;
      EXPECT_GE(r.output.size(), 80u) << r.instruction;
      EXPECT_LE(r.output.size(), 250u) << r.instruction;
      // The pattern the demo teaches: "What is a lease?" -> "A lease is ...".
      const std::string q = r.instruction;
      ASSERT_TRUE(q.rfind("What is ", 0) == 0 || q.rfind("What are ", 0) == 0) << q;
      std::string term = q.substr(q.find(' ', 5) + 1);
      term.pop_back();  // '?'
      term[0] = char(std::toupper(static_cast<unsigned char>(term[0])));
      EXPECT_EQ(r.output.rfind(term + " ", 0), 0u) << q << " -> " << r.output;
    }
}

TEST(BuiltinResolve, CachesAVersionedFolderWithTokenizer) {
  ScratchDir cache;
  const char* old = std::getenv("QLORA_CACHE");
  const std::string saved = old ? old : "";
  ::setenv("QLORA_CACHE", cache.path().c_str(), 1);
  const fs::path dir = resolve_model_path("builtin:tiny");
  EXPECT_EQ(dir, cache.path() / "builtin" / "tiny-v2");
  EXPECT_TRUE(fs::exists(dir / "tokenizer.json"));
  const auto stamp = fs::last_write_time(dir / "model.safetensors");
  EXPECT_EQ(resolve_model_path("builtin:tiny"), dir);  // reused, not rewritten
  EXPECT_EQ(fs::last_write_time(dir / "model.safetensors"), stamp);
  EXPECT_EQ(resolve_model_path("/some/model"), fs::path("/some/model"));
  if (old)
    ::setenv("QLORA_CACHE", saved.c_str(), 1);
  else
    ::unsetenv("QLORA_CACHE");
}

}  // namespace
}  // namespace qlora
