// `qlora tokenize` end to end: ids and pieces, --ids-only, usage errors.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "testing.h"
#include "tokenizer/tokenizer.h"

namespace qlora {
namespace {

struct CliResult {
  int code;
  std::string out;
};

CliResult run_qlora(const std::string& args) {
  const std::string cmd = std::string("'") + QLORA_BINARY + "' " + args + " 2>&1";
  CliResult r{-1, {}};
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  for (size_t n; (n = fread(buf.data(), 1, buf.size(), p)) > 0;) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

TEST(TokenizerCli, PrintsIdsAndPieces) {
  QLORA_REQUIRE_FIXTURES(fx);
  const std::string dir = (fx / "tokenizers/llama3/assembled_hf").string();
  const CliResult ids = run_qlora("tokenize --tokenizer '" + dir + "' --text 'Hello world' --ids-only");
  EXPECT_EQ(ids.code, 0) << ids.out;
  EXPECT_EQ(ids.out, "128000 9906 1917\n");
  const CliResult nobos = run_qlora("tokenize --tokenizer '" + dir + "' --text 'Hello world' --ids-only --no-special");
  EXPECT_EQ(nobos.out, "9906 1917\n");
  const CliResult full = run_qlora("tokenize --tokenizer '" + dir + "' --text 'Hello world'");
  EXPECT_EQ(full.code, 0);
  EXPECT_NE(full.out.find("1917\t\"\xC4\xA0world\""), std::string::npos) << full.out;
  EXPECT_NE(full.out.find("3 tokens"), std::string::npos) << full.out;

  testing::ScratchDir d;
  testing::write_bytes(d / "in.txt", "Hello world");
  const CliResult file = run_qlora("tokenize --tokenizer '" + dir + "' --file '" + (d / "in.txt").string() + "' --ids-only");
  EXPECT_EQ(file.out, "128000 9906 1917\n");
}

TEST(TokenizerCli, UsageErrors) {
  testing::ScratchDir d;
  const CliResult missing = run_qlora("tokenize --tokenizer '" + (d / "nope").string() + "' --text x");
  EXPECT_EQ(missing.code, 1);
  EXPECT_NE(missing.out.find("nope"), std::string::npos) << missing.out;
  const CliResult no_text = run_qlora("tokenize --tokenizer '" + d.path().string() + "'");
  EXPECT_NE(no_text.code, 0);
  const CliResult both = run_qlora("tokenize --tokenizer x --text a --file b");
  EXPECT_NE(both.code, 0);
}

}  // namespace
}  // namespace qlora

namespace qlora {
namespace {

// --chat renders a conversation with the template and marks exactly the
// assistant reply and its end-of-turn token as trained.
TEST(TokenizerCli, ChatMarksTheTrainedTokens) {
  QLORA_REQUIRE_FIXTURES(fx);
  const std::string dir = (fx / "tokenizers/llama3/assembled_hf").string();
  const std::string conv = R"('[{"role":"user","content":"Hi there"},{"role":"assistant","content":"Hello, friend!"}]')";
  const CliResult r = run_qlora("tokenize --tokenizer '" + dir + "' --chat --template llama3 --text " + conv);
  ASSERT_EQ(r.code, 0) << r.out;
  const auto reply = Tokenizer::load(dir)->encode("Hello, friend!", false);
  std::vector<std::string> trained;
  std::istringstream lines(r.out);
  for (std::string l; std::getline(lines, l);)
    if (l.find("\ttrain\t") != std::string::npos) trained.push_back(l.substr(0, l.find('\t')));
  ASSERT_EQ(trained.size(), reply.size() + 1) << r.out;
  for (size_t i = 0; i < reply.size(); ++i) EXPECT_EQ(trained[i], std::to_string(reply[i]));
  EXPECT_EQ(trained.back(), "128009");  // <|eot_id|>
  const CliResult bad = run_qlora("tokenize --tokenizer '" + dir + "' --chat --text '{not json'");
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.out.find("not valid JSON"), std::string::npos) << bad.out;
}

}  // namespace
}  // namespace qlora
