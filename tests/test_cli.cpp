// The qlora binary end to end: exit codes, messages on bad input, and the
// quick-start path (quantize + inspect of the built-in demo model).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "testing.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::ScratchDir;

struct CliRun {
  int code;  // exit status; -1 if killed by a signal (a crash)
  std::string out, err;
};

// Stdout and stderr apart (stdout is parsed as JSON); the model cache in the
// scratch folder.
CliRun run(const std::string& args, const fs::path& scratch) {
  const fs::path err = scratch / "stderr.txt";
  testing::CliResult r = testing::run_qlora(args, "QLORA_CACHE='" + (scratch / "cache").string() + "'", err);
  return {r.status, std::move(r.output), testing::read_bytes(err)};
}

TEST(Cli, HelpAndUsageErrors) {
  ScratchDir d;
  EXPECT_EQ(run("--help", d.path()).code, 0);
  EXPECT_EQ(run("", d.path()).code, 2);
  EXPECT_EQ(run("frobnicate", d.path()).code, 2);
  const CliRun r = run("quantize builtin:tiny", d.path());  // no -o
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.err.find("output"), std::string::npos) << r.err;
}

TEST(Cli, QuickStartQuantizeAndInspectTheDemoModel) {
  ScratchDir d;
  const fs::path out = d / "tiny-nf4";
  const CliRun q = run("quantize builtin:tiny -o '" + out.string() + "'", d.path());
  ASSERT_EQ(q.code, 0) << q.err;
  EXPECT_NE(q.out.find("bits/parameter"), std::string::npos) << q.out;
  const CliRun j = run("inspect --json '" + out.string() + "'", d.path());
  ASSERT_EQ(j.code, 0) << j.err;
  const auto doc = nlohmann::json::parse(j.out);
  EXPECT_EQ(doc.at("quantized_tensors"), 28);  // 4 layers x 7 projections
  EXPECT_EQ(doc.at("architecture").at("model_type"), "llama");
  EXPECT_TRUE(doc.at("problems").empty());
  const CliRun t = run("inspect '" + out.string() + "'", d.path());
  ASSERT_EQ(t.code, 0);
  EXPECT_NE(t.out.find("nf4 block 64 +double-quant"), std::string::npos) << t.out;
  EXPECT_NE(t.out.find("model.layers.3.mlp.down_proj.weight"), std::string::npos);
}

TEST(Cli, BadInputGivesAMessageAndNonZeroExitNeverACrash) {
  ScratchDir d;
  // Missing path.
  CliRun r = run("inspect '" + (d / "missing").string() + "'", d.path());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("missing"), std::string::npos) << r.err;
  // Not a safetensors file.
  testing::write_bytes(d / "notes.safetensors", "hello, this is not a model");
  r = run("inspect '" + (d / "notes.safetensors").string() + "'", d.path());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("notes.safetensors"), std::string::npos) << r.err;
  // Truncated model file.
  const CliRun q = run("quantize builtin:tiny -o '" + (d / "q").string() + "'", d.path());
  ASSERT_EQ(q.code, 0) << q.err;
  const std::string bytes = testing::read_bytes(d / "q" / "model.safetensors");
  testing::write_bytes(d / "q" / "model.safetensors", bytes.substr(0, bytes.size() / 2));
  r = run("inspect '" + (d / "q").string() + "'", d.path());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("model.safetensors"), std::string::npos) << r.err;
  // Quantizing a folder without config.json.
  fs::create_directories(d / "empty");
  r = run("quantize '" + (d / "empty").string() + "' -o '" + (d / "out").string() + "'", d.path());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("config.json"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(d / "out"));
  // Unsupported options are refused by name.
  r = run("quantize builtin:tiny -o '" + (d / "o2").string() + "' --type int4", d.path());
  EXPECT_EQ(r.code, 2);
  r = run("quantize builtin:tiny -o '" + (d / "o3").string() + "' --block-size 100", d.path());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("100"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace qlora

namespace qlora {
namespace {

// A write that fails half way (here: the file size limit, the same short-write
// path as a full disk) names the file and the cause and leaves no output.
TEST(Cli, FailedWriteLeavesNothingBehind) {
  ScratchDir d;
  const fs::path out = d / "out";
  // 64 KiB file size limit; SIGXFSZ ignored so the write fails with EFBIG.
  const CliRun r = run("quantize builtin:tiny -o '" + out.string() + "'", d.path());
  ASSERT_EQ(r.code, 0) << "warm-up to materialize builtin:tiny: " << r.err;
  const std::string cmd = "cd '" + d.path().string() + "' && ulimit -f 64 && trap '' XFSZ && QLORA_CACHE='" +
                          (d / "cache").string() + "' '" + QLORA_BINARY + "' quantize builtin:tiny -o '" +
                          (d / "out2").string() + "' 2>'" + (d / "err2.txt").string() + "'";
  const int status = std::system(("sh -c \"" + cmd + "\"").c_str());
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 1);
  const std::string err = testing::read_bytes(d / "err2.txt");
  EXPECT_NE(err.find("model.safetensors"), std::string::npos) << err;
  EXPECT_NE(err.find("too large"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(d / "out2"));
  for (const auto& e : fs::directory_iterator(d.path()))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
}

}  // namespace
}  // namespace qlora
