// A full disk and a folder without write permission (docs/reliability.md).
// A filesystem cannot be mounted here, so the disk "fills" through
// RLIMIT_FSIZE in the child (`ulimit -f`, SIGXFSZ ignored): a write past the
// limit fails with EFBIG as one on a full disk fails with ENOSPC, through the
// same error path. Each command stops with a message naming the file and the
// cause, keeps what was there before and leaves no partial file.
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "testing.h"
#include "train/checkpoint.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::read_bytes;
using testing::ScratchDir;

const fs::path kDemo = fs::path(QLORA_SOURCE_DIR) / "recipes" / "demo.yaml";

struct Result {
  int status = -1;
  std::string output;
};

// `qlora <args>` with files limited to limit_kib KiB (0: no limit).
Result qlora(const std::string& args, const fs::path& cache, int limit_kib) {
  const fs::path log = cache.parent_path() / "qlora.log";
  std::string cmd = "sh -c \"trap '' XFSZ; ";
  if (limit_kib > 0) cmd += "ulimit -f " + std::to_string(limit_kib) + "; ";
  cmd += "QLORA_CACHE='" + cache.string() + "' OMP_WAIT_POLICY=passive exec " + std::string(QLORA_BINARY) + " " +
         args + "\" > '" + log.string() + "' 2>&1";
  const int s = std::system(cmd.c_str());
  return {WIFEXITED(s) ? WEXITSTATUS(s) : -1, read_bytes(log)};
}

std::vector<std::string> temporaries(const fs::path& dir) {
  std::vector<std::string> r;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); it != fs::recursive_directory_iterator(); ++it)
    if (it->path().filename().string().find(".tmp-") != std::string::npos) r.push_back(it->path().string());
  return r;
}

std::string run_args(const fs::path& out, int steps) {
  return "run " + kDemo.string() + " output.dir=" + out.string() + " train.max_steps=" + std::to_string(steps) +
         " train.save_every=2 train.eval_every=0 data.seq_len=64 --no-samples";
}

// The checkpoint files (~300-600 KB) do not fit 100 KiB.
TEST(FullDisk, ARunStopsNamingTheCheckpointAndKeepsThePreviousOne) {
  ScratchDir d;
  const fs::path cache = d / "cache", out = d / "run";
  ASSERT_EQ(qlora(run_args(out, 2), cache, 0).status, 0);
  const fs::path before = checkpoint_path(out, 2);
  const std::string adapter_before = read_bytes(before / "adapter" / "adapter_model.safetensors");

  const Result r = qlora(run_args(out, 4) + " --resume", cache, 100);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("cannot save checkpoint " + checkpoint_path(out, 4).string()), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("File too large"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("the previous checkpoint " + before.string() + " is intact"), std::string::npos)
      << r.output;
  const ResumePoint p = find_resume_checkpoint(out);
  EXPECT_EQ(p.checkpoint, before);
  EXPECT_TRUE(p.skipped.empty());
  EXPECT_FALSE(fs::exists(checkpoint_path(out, 4)));
  EXPECT_EQ(read_bytes(before / "adapter" / "adapter_model.safetensors"), adapter_before);
  EXPECT_EQ(temporaries(out), std::vector<std::string>{});
}

// The tokenized-data cache (~150 KB for the demo) does not fit 64 KiB.
TEST(FullDisk, TheDataCacheWriteStopsNamingTheCacheFile) {
  ScratchDir d;
  const fs::path cache = d / "cache";
  ASSERT_EQ(qlora("inspect builtin:tiny", cache, 0).status, 0);  // the model (1.7 MB) exists first
  const Result r = qlora(run_args(d / "run", 1), cache, 64);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find((cache / "data").string()), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("-train.tokens: write failed: File too large"), std::string::npos) << r.output;
  EXPECT_EQ(temporaries(cache), std::vector<std::string>{});
  EXPECT_FALSE(fs::exists(d / "run" / "checkpoints"));
}

// quantize and merge write model-sized shards: nothing appears at -o.
TEST(FullDisk, QuantizeAndMergeStopNamingTheOutputAndLeaveNothing) {
  ScratchDir d;
  const fs::path cache = d / "cache";
  ASSERT_EQ(qlora(run_args(d / "run", 1), cache, 0).status, 0);

  const Result q = qlora("quantize builtin:tiny -o " + (d / "q4").string() + " --no-progress", cache, 100);
  EXPECT_EQ(q.status, 1) << q.output;
  EXPECT_NE(q.output.find((d / "q4").string()), std::string::npos) << q.output;
  EXPECT_NE(q.output.find("File too large"), std::string::npos) << q.output;
  EXPECT_FALSE(fs::exists(d / "q4"));

  const Result m = qlora("merge --model builtin:tiny --adapter " + (d / "run" / "adapter").string() + " -o " +
                             (d / "merged").string() + " --no-progress",
                         cache, 100);
  EXPECT_EQ(m.status, 1) << m.output;
  EXPECT_NE(m.output.find((d / "merged").string()), std::string::npos) << m.output;
  EXPECT_NE(m.output.find("File too large"), std::string::npos) << m.output;
  EXPECT_FALSE(fs::exists(d / "merged"));
  EXPECT_EQ(temporaries(d.path()), std::vector<std::string>{});
}

// An output folder the user cannot write into is refused before the model
// or the data load. Root writes anywhere, so as root the run is made as
// nobody (uid 65534).
TEST(FullDisk, AReadOnlyOutputFolderIsRefusedBeforeTraining) {
  ScratchDir d;
  const fs::path cache = d / "cache", out = d / "readonly";
  fs::create_directories(out);
  fs::create_directories(cache);
  fs::permissions(d.path(), fs::perms::all);  // nobody must reach the folder, and the cache
  fs::permissions(cache, fs::perms::all);
  fs::permissions(out, fs::perms::owner_read | fs::perms::owner_exec | fs::perms::group_read |
                           fs::perms::group_exec | fs::perms::others_read | fs::perms::others_exec);
  const fs::path log = d / "log";
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (::geteuid() == 0 && (::setgid(65534) != 0 || ::setuid(65534) != 0)) ::_exit(126);
    ::setenv("QLORA_CACHE", cache.c_str(), 1);
    std::freopen(log.c_str(), "w", stdout);
    ::dup2(::fileno(stdout), 2);
    const std::string o = "output.dir=" + out.string(), recipe = kDemo.string();
    ::execl(QLORA_BINARY, QLORA_BINARY, "run", recipe.c_str(), o.c_str(), "--no-samples",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  const std::string text = read_bytes(log);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 126) GTEST_SKIP() << "cannot become uid 65534 here";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1) << text;
  EXPECT_NE(text.find("output.dir " + out.string() + " is not writable"), std::string::npos) << text;
  EXPECT_NE(text.find("Permission denied"), std::string::npos) << text;
  // Refused before anything loaded: the plan is printed after the check, and
  // the built-in model was never written.
  EXPECT_EQ(text.find("plan"), std::string::npos) << text;
  EXPECT_FALSE(fs::exists(cache / "builtin")) << text;
  fs::permissions(out, fs::perms::all);
}

}  // namespace
}  // namespace qlora
