// The tokenized-data cache: round trip, keys that follow every input (by
// content, not metadata), and damaged or foreign cache files ignored rather
// than trusted.
#include <gtest/gtest.h>

#include "core/error.h"
#include "data/token_cache.h"
#include "testing.h"

namespace qlora {
namespace {

using testing::ScratchDir;
using testing::write_bytes;

std::vector<TokenizedSample> some_samples() {
  return {{{1, 2, 3}, {-100, 2, 3}}, {{7}, {-100}}, {{}, {}}, {{128000, 5, 128009}, {-100, -100, 128009}}};
}

void expect_same(const std::vector<TokenizedSample>& a, const std::vector<TokenizedSample>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].input_ids, b[i].input_ids) << i;
    EXPECT_EQ(a[i].labels, b[i].labels) << i;
  }
}

TEST(DatasetCache, RoundTripAndForeignKeys) {
  ScratchDir dir;
  const auto f = dir / "cache.bin";
  EXPECT_FALSE(load_tokenized(f, "k1").has_value());
  save_tokenized(f, "k1", some_samples());
  const auto back = load_tokenized(f, "k1");
  ASSERT_TRUE(back.has_value());
  expect_same(*back, some_samples());
  EXPECT_FALSE(load_tokenized(f, "k2").has_value());
  EXPECT_FALSE(load_tokenized(f, "k").has_value());
  save_tokenized(f, "k1", {});
  ASSERT_TRUE(load_tokenized(f, "k1").has_value());
  EXPECT_TRUE(load_tokenized(f, "k1")->empty());
}

TEST(DatasetCache, DamagedFilesAreIgnored) {
  ScratchDir dir;
  const auto f = dir / "cache.bin";
  save_tokenized(f, "key", some_samples());
  const std::string good = testing::read_bytes(f);
  // Every truncation, and a flipped byte in the count and in a length field.
  for (size_t n = 0; n < good.size(); ++n) {
    write_bytes(f, good.substr(0, n));
    EXPECT_FALSE(load_tokenized(f, "key").has_value()) << n;
  }
  for (size_t at : {size_t(8 + 8 + 3 + 7), size_t(8 + 8 + 3 + 8 + 7)}) {
    std::string bad = good;
    bad[at] = '\x7f';
    write_bytes(f, bad);
    EXPECT_FALSE(load_tokenized(f, "key").has_value()) << at;
  }
  write_bytes(f, good + "x");
  EXPECT_FALSE(load_tokenized(f, "key").has_value());
}

TEST(DatasetCache, KeyFollowsDataTokenizerAndSettings) {
  ScratchDir dir;
  write_bytes(dir / "a.jsonl", "{\"text\": \"one\"}\n");
  write_bytes(dir / "b.jsonl", "{\"text\": \"two\"}\n");
  std::filesystem::create_directories(dir / "tok");
  write_bytes(dir / "tok" / "tokenizer.json", "{}");
  const std::vector<std::filesystem::path> files = {dir / "a.jsonl", dir / "b.jsonl"};
  const auto k = tokenized_cache_key(files, dir / "tok", "template=llama3.1;train_on_inputs=0");
  EXPECT_EQ(k.size(), 32u);
  EXPECT_EQ(k, tokenized_cache_key(files, dir / "tok", "template=llama3.1;train_on_inputs=0"));
  EXPECT_NE(k, tokenized_cache_key(files, dir / "tok", "template=llama3.1;train_on_inputs=1"));
  EXPECT_NE(k, tokenized_cache_key({dir / "b.jsonl", dir / "a.jsonl"}, dir / "tok",
                                   "template=llama3.1;train_on_inputs=0"));
  write_bytes(dir / "tok" / "tokenizer_config.json", "{\"chat_template\": \"x\"}");
  const auto k2 = tokenized_cache_key(files, dir / "tok", "template=llama3.1;train_on_inputs=0");
  EXPECT_NE(k, k2);
  write_bytes(dir / "a.jsonl", "{\"text\": \"onf\"}\n");
  EXPECT_NE(k2, tokenized_cache_key(files, dir / "tok", "template=llama3.1;train_on_inputs=0"));
  EXPECT_THROW(tokenized_cache_key({dir / "missing.jsonl"}, dir / "tok", ""), Error);
  // Moving a byte from one file to the next changes the key.
  ContentHash h1, h2;
  write_bytes(dir / "x", "ab");
  write_bytes(dir / "y", "c");
  h1.add_file(dir / "x");
  h1.add_file(dir / "y");
  write_bytes(dir / "x", "a");
  write_bytes(dir / "y", "bc");
  h2.add_file(dir / "x");
  h2.add_file(dir / "y");
  EXPECT_NE(h1.hex(), h2.hex());
}

// The key hashes content, not metadata: a change of one byte anywhere in a
// large tokenizer file changes it even when size and modification time are
// put back as they were; restoring the content restores the key.
TEST(DatasetCache, KeyFollowsContentNotMetadata) {
  ScratchDir dir;
  write_bytes(dir / "a.jsonl", "{\"text\": \"one\"}\n");
  std::filesystem::create_directories(dir / "tok");
  std::string big(3'000'001, 'x');  // not a multiple of the hash's 32-byte step
  for (size_t i = 0; i < big.size(); i += 97) big[i] = char('a' + i % 26);
  const auto tj = dir / "tok" / "tokenizer.json";
  write_bytes(tj, big);
  const auto when = std::filesystem::last_write_time(tj);
  const std::vector<std::filesystem::path> files = {dir / "a.jsonl"};
  const auto k = tokenized_cache_key(files, dir / "tok", "s");
  for (size_t at : {size_t(0), size_t(31), size_t(32), size_t(1'500'017), big.size() - 1}) {
    std::string changed = big;
    changed[at] ^= 1;
    write_bytes(tj, changed);
    std::filesystem::last_write_time(tj, when);
    EXPECT_EQ(std::filesystem::file_size(tj), big.size());
    EXPECT_NE(tokenized_cache_key(files, dir / "tok", "s"), k) << at;
  }
  write_bytes(tj, big + '\0');  // a trailing zero byte is content too
  EXPECT_NE(tokenized_cache_key(files, dir / "tok", "s"), k);
  write_bytes(tj, big);
  EXPECT_EQ(tokenized_cache_key(files, dir / "tok", "s"), k);
  // Empty files hash (no mapping), and differ from a missing file.
  write_bytes(tj, "");
  const auto k_empty = tokenized_cache_key(files, dir / "tok", "s");
  std::filesystem::remove(tj);
  EXPECT_NE(tokenized_cache_key(files, dir / "tok", "s"), k_empty);
}

}  // namespace
}  // namespace qlora
