#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>

#include "testing.h"

namespace qlora::testing {

namespace fs = std::filesystem;

std::optional<fs::path> fixtures_dir() {
  if (const char* env = std::getenv("QLORA_FIXTURES"); env && *env) {
    if (fs::is_directory(env)) return fs::path(env);
    return std::nullopt;
  }
  const fs::path beside = fs::path(QLORA_SOURCE_DIR).parent_path() / "shared" / "fixtures";
  if (fs::is_directory(beside)) return beside;
  return std::nullopt;
}

std::optional<fs::path> peer_fixture(const std::string& rel) {
  if (const auto fx = fixtures_dir(); fx && fs::exists(*fx / rel)) return *fx / rel;
  const char* env = std::getenv("QLORA_PEER_FIXTURES");
  const fs::path dir = env && *env ? fs::path(env) : fs::path(QLORA_SOURCE_DIR) / "build" / "peer-fixtures";
  if (fs::exists(dir / rel)) return dir / rel;
  return std::nullopt;
}

ScratchDir::ScratchDir() {
  static std::atomic<unsigned> n{0};
  std::random_device rd;
  path_ = fs::temp_directory_path() /
          ("qlora-test-" + std::to_string(::getpid()) + "-" + std::to_string(n++) + "-" + std::to_string(rd()));
  fs::create_directories(path_);
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

CliResult run_qlora(const std::string& args, const std::string& env, const fs::path& stderr_file) {
  const std::string to = stderr_file.empty() ? std::string("&1") : "'" + stderr_file.string() + "'";
  const std::string cmd =
      env + " OMP_WAIT_POLICY=passive '" + std::string(QLORA_BINARY) + "' " + args + " 2>" + to;
  CliResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) {
    ADD_FAILURE() << "popen failed: " << cmd;
    return r;
  }
  std::array<char, 4096> buf;
  for (size_t n; (n = fread(buf.data(), 1, buf.size(), p)) > 0;) r.output.append(buf.data(), n);
  const int status = pclose(p);
  r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

FileSizeLimit::FileSizeLimit(uint64_t bytes) {
  rlimit l{};
  getrlimit(RLIMIT_FSIZE, &l);
  old_limit_ = l.rlim_cur;
  old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
  l.rlim_cur = static_cast<rlim_t>(bytes);
  setrlimit(RLIMIT_FSIZE, &l);
}

FileSizeLimit::~FileSizeLimit() {
  rlimit l{};
  getrlimit(RLIMIT_FSIZE, &l);
  l.rlim_cur = static_cast<rlim_t>(old_limit_);
  setrlimit(RLIMIT_FSIZE, &l);
  std::signal(SIGXFSZ, old_handler_);
}

}  // namespace qlora::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
