// Exactness of the tokenizer.json path against the llama.cpp test vectors
// (ids produced by HF tokenizers, encoded without BOS), decode(encode(s)) == s
// on the same strings, the same checks run from 8 threads sharing one
// Tokenizer, and the SentencePiece path against the llama-spm vectors.
#include <gtest/gtest.h>

#include <sstream>
#include <thread>

#include "testing.h"
#include "tokenizer/tokenizer.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

struct Case {
  std::string text;
  std::vector<TokenId> ids;
};

// The .inp file is a sequence of cases each followed by
// "\n__ggml_vocab_test__\n" (so a case's own last newline is part of the
// separator); the .out file holds one line of space-separated ids per case.
std::vector<Case> read_vectors(const fs::path& dir, const std::string& name) {
  const std::string inp = testing::read_bytes(dir / (name + ".inp"));
  const std::string out = testing::read_bytes(dir / (name + ".out"));
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<Case> cases;
  for (size_t pos = 0; pos < inp.size();) {
    const size_t at = inp.find(sep, pos);
    if (at == std::string::npos) break;
    cases.push_back({inp.substr(pos, at - pos), {}});
    pos = at + sep.size();
  }
  std::istringstream lines(out);
  std::string line;
  for (size_t i = 0; std::getline(lines, line); ++i) {
    if (i >= cases.size()) break;
    std::istringstream ids(line);
    for (TokenId id; ids >> id;) cases[i].ids.push_back(id);
  }
  return cases;
}

std::string show(const std::vector<TokenId>& ids) {
  std::string s;
  for (TokenId id : ids) s += std::to_string(id) + " ";
  return s;
}

// Number of cases whose encoding matches and whose decoding round-trips.
void expect_all_cases(const Tokenizer& tk, const std::vector<Case>& cases) {
  int exact = 0, round = 0;
  for (const auto& c : cases) {
    const auto ids = tk.encode(c.text, /*add_special=*/false);
    EXPECT_EQ(show(ids), show(c.ids)) << "text: [" << c.text << "]";
    exact += ids == c.ids;
    const std::string back = tk.decode(ids);
    EXPECT_EQ(back, c.text);
    round += back == c.text;
  }
  EXPECT_EQ(exact, 46);
  EXPECT_EQ(round, 46);
}

// 8 threads encode/decode every case through one shared Tokenizer.
void expect_threads_agree(const Tokenizer& tk, const std::vector<Case>& cases) {
  std::vector<int> bad(8, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 5; ++rep)
        for (size_t i = 0; i < cases.size(); ++i) {
          const auto& c = cases[(i + size_t(t) * 7) % cases.size()];
          const auto ids = tk.encode(c.text, false);
          if (ids != c.ids || tk.decode(ids) != c.text) ++bad[size_t(t)];
        }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(bad[size_t(t)], 0) << "thread " << t;
}

TEST(TokenizerVectors, LlamaSpmTokenizerJson) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto cases = read_vectors(fx / "tokenizer_tests/llamacpp", "ggml-vocab-llama-spm.gguf");
  ASSERT_EQ(cases.size(), 46u);
  const auto tk = Tokenizer::load(fx / "tokenizers/llama2-hf/tokenizer.json");
  expect_all_cases(*tk, cases);
  expect_threads_agree(*tk, cases);
}

TEST(TokenizerVectors, LlamaBpeTokenizerJson) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto cases = read_vectors(fx / "tokenizer_tests/llamacpp", "ggml-vocab-llama-bpe.gguf");
  ASSERT_EQ(cases.size(), 46u);
  const auto tk = Tokenizer::load(fx / "tokenizers/llama3/assembled_hf");
  expect_all_cases(*tk, cases);
  expect_threads_agree(*tk, cases);
}

// Qwen2's byte-level BPE (Qwen2, Qwen2.5 and Qwen3 share it: 151,643 pieces
// and Qwen2's digit-by-digit split pattern) from llama.cpp's vocab-only GGUF,
// through the GGUF tokenizer path (tokenizer/gguf_vocab: pre "qwen2"), against
// the ids HF tokenizers gives the test strings (.out). Unpacked from the
// pinned llama-cpp-python sdist by scripts/peer-fixtures.sh.
TEST(TokenizerVectors, Qwen2VocabGguf) {
  QLORA_REQUIRE_PEER_FIXTURE(gguf, "tokenizer_tests/llamacpp/ggml-vocab-qwen2.gguf");
  const auto cases = read_vectors(gguf.parent_path(), "ggml-vocab-qwen2.gguf");
  ASSERT_GE(cases.size(), 40u);
  const auto tk = Tokenizer::load(gguf);
  expect_all_cases(*tk, cases);
  expect_threads_agree(*tk, cases);
}

TEST(TokenizerVectors, LlamaSpmSentencePieceModel) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto cases = read_vectors(fx / "tokenizer_tests/llamacpp", "ggml-vocab-llama-spm.gguf");
  ASSERT_EQ(cases.size(), 46u);
  const auto tk = Tokenizer::load(fx / "tokenizers/llama2-hf/tokenizer.model");
  int exact = 0;
  std::vector<size_t> differ;
  for (size_t i = 0; i < cases.size(); ++i) {
    const auto ids = tk->encode(cases[i].text, false);
    if (ids == cases[i].ids)
      ++exact;
    else
      differ.push_back(i);
  }
  std::string list;
  for (size_t i : differ) list += std::to_string(i) + " ";
  EXPECT_EQ(exact, 46) << "cases that differ: " << list;
}

}  // namespace
}  // namespace qlora
