// Inputs that once crashed a parser under the fuzzer (fuzz/corpus/<target>/
// regress-*, docs/reliability.md), checked in the ordinary build too: each
// must now end in a qlora::Error naming its source. The sanitizer build
// replays every corpus file through the fuzz targets themselves (Fuzz.replay_*).
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "testing.h"
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

// A recipe naming a path with a byte that is not UTF-8 parsed, but was
// written back to the run folder's recipe.yaml as another path.
TEST(FuzzRegressions, RecipesThatAreNotUtf8AreRefusedWithTheLine) {
  const auto files = regressions("recipe");
  ASSERT_FALSE(files.empty());
  for (const auto& f : files) {
    const std::string e =
        testing::error_of([&] { parse_recipe(testing::read_bytes(f), "r.yaml", fs::path(QLORA_SOURCE_DIR)); });
    EXPECT_NE(e.find("r.yaml:17: invalid UTF-8"), std::string::npos) << e;
  }
}

}  // namespace
}  // namespace qlora
