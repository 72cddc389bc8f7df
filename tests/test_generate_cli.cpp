// `qlora generate` end to end on the fixture model: the ids it prints are the
// reference greedy continuation (expected_greedy_200.json), from prompt ids
// and from a text prompt through the model's tokenizer.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "testing.h"

namespace qlora {
namespace {

std::pair<int, std::string> run_generate(const std::string& args) {
  const std::string cmd = std::string("OMP_WAIT_POLICY=passive '") + QLORA_BINARY + "' generate " + args + " 2>&1";
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  for (size_t n; (n = fread(buf.data(), 1, buf.size(), p)) > 0;) out.append(buf.data(), n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

std::vector<int> ids_line(const std::string& out) {
  std::vector<int> ids;
  const size_t at = out.find("ids:");
  if (at == std::string::npos) return ids;
  std::istringstream line(out.substr(at + 4, out.find('\n', at) - at - 4));
  for (int id; line >> id;) ids.push_back(id);
  return ids;
}

TEST(GenerateCli, PrintsTheReferenceContinuation) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto dir = fx / "models/stories260K/hf";
  std::ifstream f(dir / "expected_greedy_200.json");
  const auto ref = nlohmann::json::parse(f).at("greedy_ids").get<std::vector<int>>();
  const std::string model = "--model '" + dir.string() + "' --dense --max-new-tokens 24 ";
  const auto [code, out] = run_generate(model + "--prompt-ids 1");
  ASSERT_EQ(code, 0) << out;
  EXPECT_EQ(ids_line(out), std::vector<int>(ref.begin(), ref.begin() + 24)) << out;
  EXPECT_NE(out.find("Once upon a time"), std::string::npos) << out;
  // The text of the first 6 reference tokens ("Once upon a time, there") as a
  // prompt continues with the next 24: the tokenizer re-encodes the text to
  // the same ids, after BOS.
  const auto [code2, out2] = run_generate(model + "--prompt 'Once upon a time, there'");
  ASSERT_EQ(code2, 0) << out2;
  const auto got = ids_line(out2);  // the generated ids only
  EXPECT_EQ(got, std::vector<int>(ref.begin() + 6, ref.begin() + 30)) << out2;
}

TEST(GenerateCli, BadInputIsRefused) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto dir = fx / "models/stories260K/hf";
  auto [code, out] = run_generate("--model '" + dir.string() + "' --prompt-ids '1 99999'");
  EXPECT_EQ(code, 1) << out;
  std::tie(code, out) = run_generate("--model /nonexistent/model --prompt-ids 1");
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("/nonexistent/model"), std::string::npos) << out;
}

}  // namespace
}  // namespace qlora
