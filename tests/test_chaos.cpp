// Kill -9 at any moment loses at most the steps since the last checkpoint
// and leaves nothing half-written (docs/reliability.md):
//  - Chaos: `qlora run` SIGKILLed at 20 seeded moments (at random times, and
//    inside the writes of a checkpoint, the tokenized-data cache, the report,
//    the recipe and the final adapter, via the QLORA_TEST_KILL_WRITING hook of
//    core/atomic_file.cpp) and resumed each time ends with the adapter of an
//    uninterrupted run, byte for byte, and no temporary file or folder left.
//  - A truncated or altered newest checkpoint is detected by its checksums and
//    resume falls back to the previous one, saying so.
//  - Temporaries of dead processes are removed, those of live ones kept.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/atomic_file.h"
#include "testing.h"
#include "train/checkpoint.h"
#include "train/metrics.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::read_bytes;
using testing::ScratchDir;

const fs::path kDemo = fs::path(QLORA_SOURCE_DIR) / "recipes" / "demo.yaml";

struct Outcome {
  bool killed = false;  // ended by SIGKILL
  int code = -1;        // exit status otherwise
  double seconds = 0;
};

// Runs `qlora run` on a short demo into out (always with --resume: a fresh
// folder starts at step 0), logging to log. kill_writing sets the
// QLORA_TEST_KILL_WRITING hook; kill_after_ms > 0 SIGKILLs it from outside
// after that long.
Outcome run(const fs::path& out, const fs::path& cache, const fs::path& log, const std::string& kill_writing,
            int kill_after_ms) {
  std::vector<std::string> args = {QLORA_BINARY,
                                   "run",
                                   kDemo.string(),
                                   "output.dir=" + out.string(),
                                   "train.max_steps=10",
                                   "train.save_every=2",
                                   "train.keep_checkpoints=2",
                                   "train.eval_every=0",
                                   "train.micro_batch=1",
                                   "data.seq_len=64",
                                   "device.threads=1",
                                   "logging.every=1",
                                   "--resume",
                                   "--no-samples"};
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv("QLORA_CACHE", cache.c_str(), 1);
    ::setenv("OMP_WAIT_POLICY", "passive", 1);
    if (!kill_writing.empty()) ::setenv("QLORA_TEST_KILL_WRITING", kill_writing.c_str(), 1);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  int status = 0;
  if (kill_after_ms > 0) {
    const auto deadline = t0 + std::chrono::milliseconds(kill_after_ms);
    while (::waitpid(pid, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() >= deadline) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  } else {
    ::waitpid(pid, &status, 0);
  }
  Outcome o;
  o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  o.killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
  o.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return o;
}

// Every path under dir whose name holds ".tmp-" (an AtomicFile/AtomicDir temporary).
std::vector<std::string> temporaries(const fs::path& dir) {
  std::vector<std::string> r;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); it != fs::recursive_directory_iterator(); ++it)
    if (it->path().filename().string().find(".tmp-") != std::string::npos) r.push_back(it->path().string());
  return r;
}

uint64_t size_of_first(const fs::path& dir, const std::string& suffix) {
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); it != fs::recursive_directory_iterator(); ++it) {
    const std::string p = it->path().string();
    if (p.size() >= suffix.size() && p.compare(p.size() - suffix.size(), suffix.size(), suffix) == 0)
      return fs::file_size(it->path());
  }
  return 0;
}

TEST(Chaos, TwentySigkillsAndResumesEndWithTheUninterruptedAdapter) {
  ScratchDir d;
  const fs::path cache = d / "cache", ref = d / "ref", out = d / "chaos", log = d / "log";
  const Outcome full = run(ref, cache, log, "", 0);
  ASSERT_EQ(full.code, 0) << read_bytes(log);
  const std::string want = read_bytes(ref / "adapter" / "adapter_model.safetensors");

  // The sizes of the files a kill can land in, from the uninterrupted run.
  const uint64_t ckpt_bytes = size_of_first(ref / "checkpoints", "optimizer.safetensors");
  const uint64_t cache_bytes = size_of_first(cache / "data", "-train.tokens");
  const uint64_t adapter_bytes = want.size();
  const uint64_t report_bytes = fs::file_size(ref / "report.html");
  const uint64_t recipe_bytes = fs::file_size(ref / "recipe.yaml");
  ASSERT_GT(ckpt_bytes, 0u);
  ASSERT_GT(cache_bytes, 0u);

  struct Moment {
    std::string what;       // for messages
    std::string kill_writing;
    int after_ms = 0;
    bool clear_cache = false;
  };
  std::mt19937_64 rng(20261207);
  auto below = [&](uint64_t n) { return n == 0 ? 0 : rng() % n; };
  std::vector<Moment> moments, at_end;
  for (int i = 0; i < 20; ++i) {
    Moment m;
    switch (rng() % 6) {
      case 0:
      case 1:
        m.after_ms = 1 + int(below(uint64_t(full.seconds * 1000)));
        m.what = "at " + std::to_string(m.after_ms) + " ms";
        break;
      case 2:
        m.kill_writing = "/checkpoints/step-:" + std::to_string(below(ckpt_bytes));
        m.what = "writing a checkpoint";
        break;
      case 3:
        m.kill_writing = "-train.tokens:" + std::to_string(below(cache_bytes));
        m.clear_cache = true;
        m.what = "writing the data cache";
        break;
      case 4:
        // The reports written before the end are shorter than the final one
        // measured here: kill within the first 8 KiB, which every one has.
        m.kill_writing = rng() % 2 ? "report.html:" + std::to_string(below(std::min<uint64_t>(report_bytes, 8192)))
                                   : "recipe.yaml:" + std::to_string(below(recipe_bytes));
        m.what = "writing " + m.kill_writing;
        break;
      default:
        m.kill_writing = "/adapter.tmp-:" + std::to_string(below(adapter_bytes));
        m.what = "writing the final adapter";
        at_end.push_back(m);  // reached only once every step is done
        continue;
    }
    moments.push_back(m);
  }
  moments.insert(moments.end(), at_end.begin(), at_end.end());

  int kills = 0;
  for (const Moment& m : moments) {
    if (m.clear_cache) fs::remove_all(cache / "data");
    const Outcome o = run(out, cache, log, m.kill_writing, m.after_ms);
    if (o.killed) {
      ++kills;
    } else {
      // Only an outside timer may come too late; a run that ends must end well.
      EXPECT_EQ(o.code, 0) << m.what << "\n" << read_bytes(log);
      EXPECT_GT(m.after_ms, 0) << m.what << ": the hook did not fire\n" << read_bytes(log);
    }
  }
  EXPECT_GE(kills, 14) << "most moments must be real kills";

  const Outcome last = run(out, cache, log, "", 0);
  ASSERT_EQ(last.code, 0) << read_bytes(log);
  EXPECT_TRUE(read_bytes(out / "adapter" / "adapter_model.safetensors") == want)
      << "the adapter after " << kills << " kills differs from the uninterrupted run's";
  EXPECT_EQ(read_bytes(out / "adapter" / "adapter_config.json"), read_bytes(ref / "adapter" / "adapter_config.json"));
  // Every step logged once, in order, whatever was cut.
  const MetricsHistory h = read_metrics(out / "metrics.jsonl");
  ASSERT_EQ(h.train.size(), 10u);
  for (size_t i = 0; i < h.train.size(); ++i) EXPECT_EQ(h.train[i].step, int64_t(i + 1));
  EXPECT_EQ(temporaries(out), std::vector<std::string>{});
  EXPECT_EQ(temporaries(cache), std::vector<std::string>{});
}

// A short run with a checkpoint at every step (1, 2, 3), then its newest
// damaged three ways.
TEST(Chaos, ADamagedNewestCheckpointIsDetectedAndResumeFallsBack) {
  ScratchDir d;
  const fs::path out = d / "run", cache = d / "cache", log = d / "log";
  const std::string args = "run " + kDemo.string() + " output.dir=" + out.string() +
                           " train.max_steps=3 train.save_every=1 train.keep_checkpoints=3 train.eval_every=0"
                           " data.seq_len=64 train.micro_batch=1 --no-samples";
  const std::string env = "QLORA_CACHE='" + cache.string() + "'";
  ASSERT_EQ(testing::run_qlora(args, env).status, 0);
  const fs::path newest = checkpoint_path(out, 3), previous = checkpoint_path(out, 2);
  ASSERT_EQ(find_resume_checkpoint(out).checkpoint, newest);

  auto expect_fallback = [&](const std::string& why) {
    const ResumePoint p = find_resume_checkpoint(out);
    EXPECT_EQ(p.checkpoint, previous) << why;
    ASSERT_EQ(p.skipped.size(), 1u) << why;
    EXPECT_NE(p.skipped[0].find(newest.string()), std::string::npos) << p.skipped[0];
    EXPECT_NE(p.skipped[0].find(why), std::string::npos) << p.skipped[0];
  };
  const fs::path opt = newest / "optimizer.safetensors";
  const std::string good = read_bytes(opt);

  // Truncated (a copy cut short): the recorded size differs; even the cheap
  // listing passes it over.
  testing::write_bytes(opt, good.substr(0, good.size() - 4));
  expect_fallback("truncated");
  EXPECT_EQ(latest_checkpoint(out), previous);

  // One byte altered, same size: only the digest tells.
  std::string flipped = good;
  flipped[flipped.size() / 2] ^= 0x40;
  testing::write_bytes(opt, flipped);
  expect_fallback("does not match its checksum");

  // state.json edited (still valid JSON, right step): its own digest tells.
  testing::write_bytes(opt, good);
  ASSERT_EQ(find_resume_checkpoint(out).checkpoint, newest);
  const std::string state = read_bytes(newest / "state.json");
  std::string edited = state;
  const size_t at = edited.find("\"tokens_seen\": ");
  ASSERT_NE(at, std::string::npos);
  edited.insert(at + 15, "1");
  testing::write_bytes(newest / "state.json", edited);
  expect_fallback("state.json does not match its digest");

  // `qlora run --resume` says which checkpoint it passed over, and why.
  const testing::CliResult r = testing::run_qlora(args + " --resume", env);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("checkpoint " + newest.string() + " is damaged"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("resuming from " + previous.string()), std::string::npos) << r.output;
}

// A second SIGTERM while the first is being honoured (the step finishing,
// the checkpoint being written) ends the run at once, by the signal's default
// action: a stuck run can always be stopped.
TEST(Chaos, ASecondSigtermEndsTheRunAtOnce) {
  ScratchDir d;
  const fs::path log = d / "log";
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv("QLORA_CACHE", (d / "cache").c_str(), 1);
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    const std::string out = "output.dir=" + (d / "run").string(), recipe = kDemo.string();
    ::execl(QLORA_BINARY, QLORA_BINARY, "run", recipe.c_str(), out.c_str(), "data.cache=false", "--no-samples",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Into the step loop: the demo's first log line comes after step 5.
  for (int i = 0; i < 6000 && read_bytes(log).find("step") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ::kill(pid, SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ::kill(pid, SIGTERM);
  int status = 0;
  ::waitpid(pid, &status, 0);
  const std::string text = read_bytes(log);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << "status " << status << "\n" << text;
  EXPECT_EQ(text.find("interrupted after step"), std::string::npos) << text;
}

TEST(Chaos, TemporariesOfDeadProcessesAreRemovedOthersKept) {
  ScratchDir d;
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);  // now a pid of no process
  const std::string dead = std::to_string(child), alive = std::to_string(::getppid());
  const fs::path dir = d.path();
  testing::write_bytes(dir / ("recipe.yaml.tmp-" + dead + "-0"), "half");
  fs::create_directories(dir / ("adapter.tmp-" + dead + "-3") / "inner");
  testing::write_bytes(dir / ("report.html.tmp-" + alive + "-1"), "a live run's");
  testing::write_bytes(dir / "notes.tmp-draft", "a user's file");
  testing::write_bytes(dir / ("mine.tmp-" + dead + "-x"), "not our pattern");
  remove_stale_temporaries(dir);
  EXPECT_FALSE(fs::exists(dir / ("recipe.yaml.tmp-" + dead + "-0")));
  EXPECT_FALSE(fs::exists(dir / ("adapter.tmp-" + dead + "-3")));
  EXPECT_TRUE(fs::exists(dir / ("report.html.tmp-" + alive + "-1")));
  EXPECT_TRUE(fs::exists(dir / "notes.tmp-draft"));
  EXPECT_TRUE(fs::exists(dir / ("mine.tmp-" + dead + "-x")));

  // A run killed before its first save left only a temporary: --resume
  // cleans it and starts, instead of calling the folder foreign.
  const fs::path out = d / "run";
  fs::create_directories(out);
  testing::write_bytes(out / ("recipe.yaml.tmp-" + dead + "-0"), "half");
  const testing::CliResult r = testing::run_qlora(
      "run " + kDemo.string() + " output.dir=" + out.string() +
          " train.max_steps=1 train.eval_every=0 data.seq_len=64 --no-samples --resume",
      "QLORA_CACHE='" + (d / "cache").string() + "'");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(temporaries(out), std::vector<std::string>{});
}

}  // namespace
}  // namespace qlora
