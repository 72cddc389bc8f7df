// The whole data path in one call (src/data/pipeline.h): cache hits give the
// same rows as a fresh tokenization, every tokenization setting changes the
// key, and the split accounts for every sample.
#include <gtest/gtest.h>

#include "core/error.h"
#include "data/pipeline.h"
#include "testing.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

struct Fixture {
  fs::path tokenizer_dir;
  std::unique_ptr<Tokenizer> tok;
  DataSpec spec;
};

Fixture alpaca_fixture(const fs::path& fx, const fs::path& cache) {
  Fixture f;
  f.tokenizer_dir = fx / "tokenizers" / "llama3" / "assembled_hf";
  f.tok = Tokenizer::load(f.tokenizer_dir);
  f.spec.train_files = {fx / "datasets" / "alpaca" / "alpaca_data_first102.json"};
  f.spec.read.format = DataFormat::alpaca;
  f.spec.chat_template = "alpaca";
  f.spec.pack.seq_len = 512;
  f.spec.cache_dir = cache;
  f.spec.seed = 7;
  return f;
}

void expect_same_rows(const PackResult& a, const PackResult& b) {
  ASSERT_EQ(a.rows.size(), b.rows.size());
  for (size_t i = 0; i < a.rows.size(); ++i) {
    EXPECT_EQ(a.rows[i].input_ids, b.rows[i].input_ids) << "row " << i;
    EXPECT_EQ(a.rows[i].labels, b.rows[i].labels) << "row " << i;
    EXPECT_EQ(a.rows[i].position_ids, b.rows[i].position_ids) << "row " << i;
    EXPECT_EQ(a.rows[i].doc_offsets, b.rows[i].doc_offsets) << "row " << i;
  }
}

TEST(DatasetPipeline, SecondLoadComesFromTheCacheWithIdenticalRows) {
  QLORA_REQUIRE_FIXTURES(fx);
  testing::ScratchDir dir;
  Fixture f = alpaca_fixture(fx, dir / "cache");
  const PreparedData first = prepare_dataset(*f.tok, f.tokenizer_dir, f.spec);
  EXPECT_FALSE(first.from_cache);
  EXPECT_EQ(first.train_samples, 102u);
  EXPECT_GT(first.train.rows.size(), 0u);
  const PreparedData second = prepare_dataset(*f.tok, f.tokenizer_dir, f.spec);
  EXPECT_TRUE(second.from_cache);
  EXPECT_EQ(second.cache_key, first.cache_key);
  expect_same_rows(first.train, second.train);
  // Without a cache folder, the same rows again.
  f.spec.cache_dir.reset();
  const PreparedData fresh = prepare_dataset(*f.tok, f.tokenizer_dir, f.spec);
  EXPECT_FALSE(fresh.from_cache);
  expect_same_rows(first.train, fresh.train);
}

TEST(DatasetPipeline, TokenizationSettingsChangeTheKeyPackingDoesNot) {
  QLORA_REQUIRE_FIXTURES(fx);
  testing::ScratchDir dir;
  Fixture f = alpaca_fixture(fx, dir / "cache");
  const std::string base = prepare_dataset(*f.tok, f.tokenizer_dir, f.spec).cache_key;
  f.spec.tokenize.train_on_inputs = true;
  const PreparedData inputs = prepare_dataset(*f.tok, f.tokenizer_dir, f.spec);
  EXPECT_NE(inputs.cache_key, base);
  EXPECT_FALSE(inputs.from_cache);
  f.spec.tokenize.train_on_inputs = false;
  f.spec.pack.seq_len = 1024;
  const PreparedData longer = prepare_dataset(*f.tok, f.tokenizer_dir, f.spec);
  EXPECT_EQ(longer.cache_key, base);
  EXPECT_TRUE(longer.from_cache);
}

TEST(DatasetPipeline, ValidationSplitAndStatistics) {
  QLORA_REQUIRE_FIXTURES(fx);
  testing::ScratchDir dir;
  Fixture f = alpaca_fixture(fx, dir / "cache");
  f.spec.val_fraction = 0.1;
  const PreparedData d = prepare_dataset(*f.tok, f.tokenizer_dir, f.spec);
  EXPECT_EQ(d.train_samples + d.val_samples, 102u);
  EXPECT_EQ(d.val_samples, 10u);  // round(0.1 * 102)
  EXPECT_EQ(d.train.stats.samples_in, d.train_samples);
  EXPECT_EQ(d.val.stats.samples_in, d.val_samples);
  EXPECT_GT(d.train.stats.trained_tokens, 0);
  EXPECT_LT(d.train.stats.trained_tokens, d.train.stats.tokens);  // prompts are masked
  const std::string text = data_statistics_text(d);
  EXPECT_NE(text.find("template alpaca"), std::string::npos) << text;
  EXPECT_NE(text.find("packing efficiency"), std::string::npos) << text;
  EXPECT_NE(text.find("val "), std::string::npos) << text;
  // A bad fraction is refused.
  f.spec.val_fraction = 1.0;
  EXPECT_THROW(prepare_dataset(*f.tok, f.tokenizer_dir, f.spec), Error);
}

}  // namespace
}  // namespace qlora
