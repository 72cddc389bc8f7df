// `qlora generate` end to end on the fixture model: the ids it prints are the
// reference greedy continuation (expected_greedy_200.json), from prompt ids
// and from a text prompt through the model's tokenizer.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "testing.h"
#include "train/backend.h"

namespace qlora {
namespace {

using testing::CliResult;
using testing::run_qlora;

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
  // The CPU's fp32 path is the one the reference continuation pins down.
  const std::string model = "--model '" + dir.string() + "' --dense --device cpu --max-new-tokens 24 ";
  const CliResult r = run_qlora("generate " + model + "--prompt-ids 1");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(ids_line(r.output), std::vector<int>(ref.begin(), ref.begin() + 24)) << r.output;
  EXPECT_NE(r.output.find("Once upon a time"), std::string::npos) << r.output;
  // The text of the first 6 reference tokens ("Once upon a time, there") as a
  // prompt continues with the next 24: the tokenizer re-encodes the text to
  // the same ids, after BOS.
  const CliResult text = run_qlora("generate " + model + "--prompt 'Once upon a time, there'");
  ASSERT_EQ(text.status, 0) << text.output;
  const auto got = ids_line(text.output);  // the generated ids only
  EXPECT_EQ(got, std::vector<int>(ref.begin() + 6, ref.begin() + 30)) << text.output;
}

TEST(GenerateCli, BadInputIsRefused) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto dir = fx / "models/stories260K/hf";
  CliResult r = run_qlora("generate --model '" + dir.string() + "' --prompt-ids '1 99999'");
  EXPECT_EQ(r.status, 1) << r.output;
  r = run_qlora("generate --model /nonexistent/model --prompt-ids 1");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("/nonexistent/model"), std::string::npos) << r.output;
}

// Where the GPU cannot run (every CI machine): `cuda` is refused with the
// reason before the model is read, `auto` generates on the CPU with a warning.
TEST(GenerateCli, DeviceChoiceWithoutAUsableGpu) {
  const auto why = cuda_backend_unavailable();
  if (!why) GTEST_SKIP() << "this machine can generate on its GPU (tests/test_cuda_generate.cpp covers it)";
  CliResult r = run_qlora("generate --model /nonexistent/model --prompt-ids 1 --device cuda");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--device cuda: " + *why), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("/nonexistent/model"), std::string::npos) << "refused before reading: " << r.output;
  r = run_qlora("generate --model builtin:tiny --prompt-ids '1 2 3' --max-new-tokens 4 --device auto");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("warning: --device auto: " + *why + "; generating on the CPU"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("ids: "), std::string::npos) << r.output;
  r = run_qlora("generate --model builtin:tiny --prompt-ids 1 --device gpu");
  EXPECT_NE(r.status, 0) << r.output;
}

}  // namespace
}  // namespace qlora
