// Inputs that once crashed a parser under the fuzzer (fuzz/corpus/<target>/
// regress-*, docs/reliability.md), checked in the ordinary build too: each
// must now end in a qlora::Error naming its source. The sanitizer build
// replays every corpus file through the fuzz targets themselves (Fuzz.replay_*).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "test_models.h"
#include "testing.h"
#include "data/dataset_reader.h"
#include "model/lora.h"
#include "train/peft_adapter.h"
#include "recipe/recipe.h"
#include "tokenizer/loaders.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

std::vector<fs::path> regressions(const std::string& target) {
  std::vector<fs::path> r;
  for (const auto& e : fs::directory_iterator(fs::path(QLORA_SOURCE_DIR) / "fuzz" / "corpus" / target))
    if (e.path().filename().string().rfind("regress-", 0) == 0) r.push_back(e.path());
  return r;
}

// A ModelProto with an empty piece made libsentencepiece's trie builder
// throw its own exception type past our error handling.
TEST(FuzzRegressions, SentencepieceModelsAreRefusedByName) {
  const auto files = regressions("sentencepiece");
  ASSERT_FALSE(files.empty());
  for (const auto& f : files) {
    const std::string e = testing::error_of([&] { tok::load_sentencepiece(f, {}); });
    EXPECT_NE(e.find(f.string()), std::string::npos) << e;
  }
}

fs::path regression(const std::string& target, const std::string& name) {
  return fs::path(QLORA_SOURCE_DIR) / "fuzz" / "corpus" / target / ("regress-" + name);
}

// A recipe naming a path with a byte that is not UTF-8 parsed, but was
// written back to the run folder's recipe.yaml as another path.
TEST(FuzzRegressions, RecipesThatAreNotUtf8AreRefusedWithTheLine) {
  const std::string e = testing::error_of([&] {
    parse_recipe(testing::read_bytes(regression("recipe", "non-utf8-path")), "r.yaml", QLORA_SOURCE_DIR);
  });
  EXPECT_NE(e.find("r.yaml:17: invalid UTF-8"), std::string::npos) << e;
}

// yaml-cpp 0.7 loops forever, allocating, on a document whose first token
// is ','; such a recipe or override value is refused before it gets there.
TEST(FuzzRegressions, YamlDocumentsStartingWithACommaAreRefusedNotHung) {
  const std::string e = testing::error_of([&] {
    parse_recipe(testing::read_bytes(regression("recipe", "yaml-cpp-hang-comma")), "r.yaml", QLORA_SOURCE_DIR);
  });
  EXPECT_NE(e.find("r.yaml:2: invalid YAML: a document cannot start with ','"), std::string::npos) << e;
  for (const std::string yaml : {",a: b\n", "# x\n\n  ,a\n", "model:\n  path: x\n---\n,a\n", "--- ,a\n"}) {
    const std::string e2 = testing::error_of([&] { parse_recipe(yaml, "r.yaml", QLORA_SOURCE_DIR); });
    EXPECT_NE(e2.find("cannot start with ','"), std::string::npos) << yaml << ": " << e2;
  }
  const std::string e3 = testing::error_of([&] {
    parse_recipe("model:\n  path: builtin:tiny\n", "r.yaml", QLORA_SOURCE_DIR, {"train.lr=,5"});
  });
  EXPECT_NE(e3.find("cannot start with ','"), std::string::npos) << e3;
  // A comma later in a document is YAML as usual.
  const std::string e4 = testing::error_of([&] {
    parse_recipe("lora:\n  targets: [q_proj\n    , v_proj]\n", "r.yaml", QLORA_SOURCE_DIR);
  });
  EXPECT_EQ(e4.find("cannot start with ','"), std::string::npos) << e4;
}

// The general form of the hang above: yaml-cpp's LoadAll asked for documents
// forever once its parser stopped at a ',' after a document's value (here a
// tag: "!trai,n.lr..."). Documents are now counted with the parser itself.
TEST(FuzzRegressions, YamlCommasAfterADocumentsValueAreRefusedNotHung) {
  const std::string e = testing::error_of([&] {
    parse_recipe(testing::read_bytes(regression("recipe", "yaml-cpp-hang-tag-comma")), "r.yaml",
                 QLORA_SOURCE_DIR);
  });
  EXPECT_NE(e.find("r.yaml:1:6: invalid YAML: ',' after the document's value"), std::string::npos) << e;
  for (const std::string yaml : {"!x ,a\n", "&a !x ,b\n", "!x\n,a\n", "[a] ,b\n", "\"a\" ,b\n", "- a\n,b\n",
                                 "|\n  x\n,b\n", "{a: 1} ,b\n", "model:\n  path: x\n--- !x ,a\n"}) {
    const std::string e2 = testing::error_of([&] { parse_recipe(yaml, "r.yaml", QLORA_SOURCE_DIR); });
    EXPECT_NE(e2.find("invalid YAML: ','"), std::string::npos) << yaml << ": " << e2;
  }
  // A comma continuing a plain scalar is YAML as usual ("x ,b").
  const std::string e3 = testing::error_of([&] { parse_recipe("x\n,b\n", "r.yaml", QLORA_SOURCE_DIR); });
  EXPECT_EQ(e3.find("invalid YAML"), std::string::npos) << e3;
}

// A number too large for a double ("29e889") is nlohmann's out_of_range,
// which escaped the reader's parse_error handler.
TEST(FuzzRegressions, DatasetNumbersTooLargeAreMalformedJson) {
  const std::string bytes = testing::read_bytes(regression("dataset", "number-overflow"));
  testing::ScratchDir d;
  testing::write_bytes(d / "data.json", bytes.substr(1));  // the first byte picks the format
  ReadOptions o;
  o.format = DataFormat::tokens;
  const std::string e = testing::error_of([&] { read_dataset(d / "data.json", o); });
  EXPECT_NE(e.find("malformed JSON"), std::string::npos) << e;
  testing::write_bytes(d / "data.jsonl", "{\"input_ids\": [1e999]}\n");
  const std::string e2 = testing::error_of([&] { read_dataset(d / "data.jsonl", o); });
  EXPECT_NE(e2.find("data.jsonl:1: malformed JSON"), std::string::npos) << e2;
}

// "r": 1.44e98 in adapter_config.json: nlohmann's get<int64_t>() cast the
// double out of range (UBSan: float-cast-overflow; found by fuzz_peft_config
// in CI). Integers are now read by json_integer (core/json_integer.h).
TEST(FuzzRegressions, AdapterRankThatIsNotAnIntegerIsRefusedByKey) {
  const ModelConfig cfg = testing::tiny_gqa_config(2);
  LoraConfig lc;
  lc.rank = 2;
  testing::ScratchDir dir;
  save_peft_adapter(testing::random_lora(cfg, lc, 3), cfg, dir / "a", "base");
  testing::write_bytes(dir / "a" / "adapter_config.json",
                       testing::read_bytes(regression("peft_config", "rank-float-overflow")));
  const std::string e = testing::error_of([&] { (void)LoraWeights::load_peft(dir / "a", cfg); });
  EXPECT_NE(e.find("adapter_config.json: \"r\" must be an integer, got number"), std::string::npos) << e;
}

// A vocabulary id 1.06e115 in tokenizer.json was read by get<TokenId>():
// UBSan float-cast-overflow (found by fuzz_tokenizer_json in CI).
TEST(FuzzRegressions, TokenizerJsonIdsThatAreNotIntegersAreRefusedByPiece) {
  testing::ScratchDir dir;
  testing::write_bytes(dir / "tokenizer.json",
                       testing::read_bytes(regression("tokenizer_json", "vocab-id-float-overflow")));
  const std::string e =
      testing::error_of([&] { (void)tok::load_tokenizer_json(dir / "tokenizer.json", {}); });
  EXPECT_NE(e.find("tokenizer.json: vocab entry '<0x63>' must be an integer, got number"), std::string::npos)
      << e;
}

}  // namespace
}  // namespace qlora
