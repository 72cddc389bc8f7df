// `qlora chat` in a real pseudo-terminal (forkpty): the prompt names the
// model, replies stream, /adapter switches, /reset clears, Ctrl-C at the
// prompt leaves nothing, Ctrl-C during a reply stops that reply and the chat
// goes on, Ctrl-D leaves with status 0.
#include <gtest/gtest.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>

#include "io/hf_config.h"
#include "model/builtin.h"
#include "test_models.h"
#include "testing.h"
#include "train/checkpoint.h"
#include "train/peft_adapter.h"

namespace qlora {
namespace {

// A child running `qlora <args>` on a pseudo-terminal.
class PtyChild {
 public:
  explicit PtyChild(const std::string& args) {
    const std::string cmd = "OMP_WAIT_POLICY=passive exec '" + std::string(QLORA_BINARY) + "' " + args;
    pid_ = forkpty(&fd_, nullptr, nullptr, nullptr);
    if (pid_ == 0) {
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
  }
  ~PtyChild() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (fd_ >= 0) close(fd_);
  }
  bool started() const { return pid_ > 0; }
  void send(const std::string& s) { ASSERT_EQ(write(fd_, s.data(), s.size()), ssize_t(s.size())); }
  // Reads until `want` appears after `from` in everything read so far, or the
  // timeout; returns whether it appeared.
  bool wait_for(const std::string& want, size_t from, double seconds) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (all_.find(want, from) == std::string::npos) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, int(left.count())) <= 0) continue;
      char buf[4096];
      const ssize_t n = read(fd_, buf, sizeof buf);
      if (n <= 0) return all_.find(want, from) != std::string::npos;  // the child closed the terminal
      all_.append(buf, size_t(n));
    }
    return true;
  }
  // The exit status, or -1 (a signal, or still running after `seconds`).
  int wait_exit(double seconds) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < end) {
      wait_for("\x01never", all_.size(), 0.05);  // drain the terminal
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
    }
    return -1;
  }
  const std::string& output() const { return all_; }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
  bool exited_ = false;
  std::string all_;
};

TEST(ChatCli, HistoryAdapterSwitchResetAndLeaving) {
  const auto model = resolve_model_path("builtin:tiny");
  const ModelConfig cfg = load_model_config(model);
  testing::ScratchDir d;
  const std::string fp = base_model_fingerprint(model);
  save_peft_adapter(testing::random_lora(cfg, LoraConfig{}, 1, 0.3f), cfg, d / "legal", "b", fp);
  save_peft_adapter(testing::random_lora(cfg, LoraConfig{}, 2, 0.3f), cfg, d / "medical", "b", fp);
  PtyChild c("chat --model builtin:tiny --chat-template alpaca --max-new-tokens 8 --adapter '" +
             (d / "legal").string() + "' --adapter '" + (d / "medical").string() + "'");
  ASSERT_TRUE(c.started());
  ASSERT_TRUE(c.wait_for("legal> ", 0, 60)) << c.output();
  size_t at = c.output().size();
  c.send("Hello there\n");
  ASSERT_TRUE(c.wait_for("legal> ", at, 30)) << c.output();
  // The echo, a reply line, the prompt again.
  const std::string turn = c.output().substr(at);
  EXPECT_EQ(turn.rfind("Hello there", 0), 0u) << turn;
  at = c.output().size();
  c.send("/adapter\n");
  ASSERT_TRUE(c.wait_for("models: base *legal medical", at, 10)) << c.output();
  at = c.output().size();
  c.send("/adapter medical\n");
  ASSERT_TRUE(c.wait_for("(now answering with medical", at, 10)) << c.output();
  ASSERT_TRUE(c.wait_for("medical> ", at, 10)) << c.output();
  at = c.output().size();
  c.send("/reset\n");
  ASSERT_TRUE(c.wait_for("(conversation cleared)", at, 10)) << c.output();
  ASSERT_TRUE(c.wait_for("medical> ", at, 10)) << c.output();
  // Ctrl-C at the prompt: a hint, not an exit.
  at = c.output().size();
  c.send("\x03");
  ASSERT_TRUE(c.wait_for("(/quit or Ctrl-D leaves)", at, 10)) << c.output();
  at = c.output().size();
  c.send("Still here?\n");
  ASSERT_TRUE(c.wait_for("medical> ", at, 30)) << c.output();
  c.send("\x04");  // Ctrl-D at the start of a line: end of input
  EXPECT_EQ(c.wait_exit(20), 0) << c.output();
}

// Ctrl-C while a reply streams needs a reply slow enough to catch: the
// SmolLM2-135M fixture, asked for up to 400 tokens.
TEST(ChatCli, CtrlCStopsTheReplyAndTheChatGoesOn) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto gguf = fx / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(gguf)) GTEST_SKIP() << gguf << " absent";
  PtyChild c("chat --model '" + gguf.string() + "' --max-new-tokens 400 --temperature 0.9 --seed 1");
  ASSERT_TRUE(c.started());
  ASSERT_TRUE(c.wait_for("base> ", 0, 120)) << c.output();
  size_t at = c.output().size();
  c.send("Write a very long story about a dragon.\n");
  ASSERT_TRUE(c.wait_for("dragon.", at, 10)) << c.output();
  const size_t reply_at = c.output().find("dragon.", at) + 7;
  // Some reply text beyond the echo, then Ctrl-C.
  ASSERT_TRUE(c.wait_for(" ", reply_at + 2, 60)) << c.output();
  c.send("\x03");
  ASSERT_TRUE(c.wait_for(" [stopped]", reply_at, 30)) << c.output();
  ASSERT_TRUE(c.wait_for("base> ", reply_at, 10)) << c.output();
  at = c.output().size();
  c.send("/quit\n");
  EXPECT_EQ(c.wait_exit(20), 0) << c.output();
}

}  // namespace
}  // namespace qlora
