// `qlora tokenize` end to end: ids and pieces, --ids-only, usage errors.
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "testing.h"
#include "tokenizer/tokenizer.h"

namespace qlora {
namespace {

using testing::CliResult;
using testing::run_qlora;

TEST(TokenizerCli, PrintsIdsAndPieces) {
  QLORA_REQUIRE_FIXTURES(fx);
  const std::string dir = (fx / "tokenizers/llama3/assembled_hf").string();
  const CliResult ids = run_qlora("tokenize --tokenizer '" + dir + "' --text 'Hello world' --ids-only");
  EXPECT_EQ(ids.status, 0) << ids.output;
  EXPECT_EQ(ids.output, "128000 9906 1917\n");
  const CliResult nobos =
      run_qlora("tokenize --tokenizer '" + dir + "' --text 'Hello world' --ids-only --no-special");
  EXPECT_EQ(nobos.output, "9906 1917\n");
  const CliResult full = run_qlora("tokenize --tokenizer '" + dir + "' --text 'Hello world'");
  EXPECT_EQ(full.status, 0);
  EXPECT_NE(full.output.find("1917\t\"\xC4\xA0world\""), std::string::npos) << full.output;
  EXPECT_NE(full.output.find("3 tokens"), std::string::npos) << full.output;

  testing::ScratchDir d;
  testing::write_bytes(d / "in.txt", "Hello world");
  const CliResult file =
      run_qlora("tokenize --tokenizer '" + dir + "' --file '" + (d / "in.txt").string() + "' --ids-only");
  EXPECT_EQ(file.output, "128000 9906 1917\n");
}

TEST(TokenizerCli, UsageErrors) {
  testing::ScratchDir d;
  const CliResult missing = run_qlora("tokenize --tokenizer '" + (d / "nope").string() + "' --text x");
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.output.find("nope"), std::string::npos) << missing.output;
  const CliResult no_text = run_qlora("tokenize --tokenizer '" + d.path().string() + "'");
  EXPECT_NE(no_text.status, 0);
  const CliResult both = run_qlora("tokenize --tokenizer x --text a --file b");
  EXPECT_NE(both.status, 0);
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
  const std::string conv =
      R"('[{"role":"user","content":"Hi there"},{"role":"assistant","content":"Hello, friend!"}]')";
  const CliResult r = run_qlora("tokenize --tokenizer '" + dir + "' --chat --template llama3 --text " + conv);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto reply = Tokenizer::load(dir)->encode("Hello, friend!", false);
  std::vector<std::string> trained;
  std::istringstream lines(r.output);
  for (std::string l; std::getline(lines, l);)
    if (l.find("\ttrain\t") != std::string::npos) trained.push_back(l.substr(0, l.find('\t')));
  ASSERT_EQ(trained.size(), reply.size() + 1) << r.output;
  for (size_t i = 0; i < reply.size(); ++i) EXPECT_EQ(trained[i], std::to_string(reply[i]));
  EXPECT_EQ(trained.back(), "128009");  // <|eot_id|>
  const CliResult bad = run_qlora("tokenize --tokenizer '" + dir + "' --chat --text '{not json'");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("not valid JSON"), std::string::npos) << bad.output;
}

}  // namespace
}  // namespace qlora
