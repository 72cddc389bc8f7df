// Shared helpers for the test suite: where the fixtures are, scratch folders,
// running the qlora binary, making writes fail.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"

namespace qlora::testing {

// $name when set and not empty, else `built_in`; read once per name by the callers below.
inline std::string path_from_env(const char* name, const char* built_in) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : std::string(built_in);
}

}  // namespace qlora::testing

// The source tree (test data: tests/reference, tests/data, recipes) and the qlora binary the
// tests use are the paths compiled in (tests/CMakeLists.txt) unless $QLORA_SOURCE_DIR or
// $QLORA_BINARY name others: a test binary copied elsewhere (the GPU bundle of
// scripts/gpu-bundle.sh, docs/gpu.md) finds its data and its qlora through them. The macros keep
// their names, so every use goes through the override; they are now `const char*` expressions,
// not string literals (write std::string(QLORA_SOURCE_DIR) + "/x", not QLORA_SOURCE_DIR "/x").
#ifdef QLORA_SOURCE_DIR
namespace qlora::testing {
inline constexpr const char* kBuiltSourceDir = QLORA_SOURCE_DIR;
inline const char* source_dir() {
  static const std::string dir = path_from_env("QLORA_SOURCE_DIR", kBuiltSourceDir);
  return dir.c_str();
}
}  // namespace qlora::testing
#undef QLORA_SOURCE_DIR
#define QLORA_SOURCE_DIR (::qlora::testing::source_dir())
#endif
#ifdef QLORA_BINARY
namespace qlora::testing {
inline constexpr const char* kBuiltBinary = QLORA_BINARY;
inline const char* qlora_binary() {
  static const std::string bin = path_from_env("QLORA_BINARY", kBuiltBinary);
  return bin.c_str();
}
}  // namespace qlora::testing
#undef QLORA_BINARY
#define QLORA_BINARY (::qlora::testing::qlora_binary())
#endif

namespace qlora::testing {

// ../shared/fixtures beside the checkout, or $QLORA_FIXTURES; nullopt if neither exists.
std::optional<std::filesystem::path> fixtures_dir();

// A file the peer libraries publish on PyPI, which scripts/peer-fixtures.sh
// unpacks into build/peer-fixtures/ (or $QLORA_PEER_FIXTURES) in the layout
// of the shared fixtures, e.g. "chat_templates/Qwen-Qwen3-0.6B.jinja"; the
// shared fixtures are looked at first. nullopt when absent.
std::optional<std::filesystem::path> peer_fixture(const std::string& rel);

// A fresh empty folder under the system temp dir, removed when the object dies.
class ScratchDir {
 public:
  ScratchDir();
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// Writes bytes to a file (test setup only; not atomic).
void write_bytes(const std::filesystem::path& p, const std::string& bytes);
std::string read_bytes(const std::filesystem::path& p);

// One run of the qlora binary (QLORA_BINARY).
struct CliResult {
  int status = -1;     // exit code; -1 if killed by a signal (a crash) or not started
  std::string output;  // stdout, and stderr too unless it went to a file
};

// Runs `qlora <args>` through the shell with OMP_WAIT_POLICY=passive (spinning
// OpenMP threads would compete with the other tests for the cores). `env`
// ("QLORA_CACHE='/x'") is put before the command; stderr joins the output,
// or goes to `stderr_file` when one is given (to parse stdout on its own).
CliResult run_qlora(const std::string& args, const std::string& env = "",
                    const std::filesystem::path& stderr_file = {});

// Makes this process's writes past `bytes` fail with EFBIG (as a full disk
// fails them with ENOSPC) while alive; works for root too, unlike a read-only
// folder. SIGXFSZ is ignored meanwhile so the write fails instead of killing.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(uint64_t bytes);
  ~FileSizeLimit();
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  uint64_t old_limit_ = 0;
  void (*old_handler_)(int) = nullptr;
};

// The message of the qlora::Error f throws; fails the test if it throws none.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a qlora::Error";
  return "";
}

// An element count as a size_t index (the op signatures count in int64_t).
inline size_t sz(int64_t n) { return static_cast<size_t>(n); }

// n values ~ N(0, sigma^2) from a fixed seed.
inline std::vector<float> randn(int64_t n, unsigned seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = d(rng);
  return x;
}

// ||got - want|| / ||want|| (L2, in double): the whole-model comparisons of
// the GPU against the CPU reference.
inline double rel_l2(const std::vector<float>& want, const std::vector<float>& got) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += double(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// A tensor of a golden file as T values; a missing one fails the test with
// the command that regenerates the file.
template <typename T>
std::vector<T> golden_tensor(const SafetensorsFile& f, const std::string& name, const char* regenerate) {
  const TensorInfo* t = f.find(name);
  if (!t) {
    ADD_FAILURE() << "golden tensor " << name << " missing: " << regenerate;
    return {};
  }
  const auto bytes = f.data(*t);
  std::vector<T> v(bytes.size() / sizeof(T));
  std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

}  // namespace qlora::testing

// Skips the current test unless peer_fixture(rel) exists.
#define QLORA_REQUIRE_PEER_FIXTURE(var, rel)                                                  \
  auto var##_opt = ::qlora::testing::peer_fixture(rel);                                       \
  if (!var##_opt) GTEST_SKIP() << "peer fixture " << (rel) << " not found: run "              \
                                  "scripts/peer-fixtures.sh (it unpacks it from a PyPI sdist)"; \
  const std::filesystem::path var = *var##_opt

// Skips the current test with a message naming what is missing.
#define QLORA_REQUIRE_FIXTURES(var)                                                         \
  auto var##_opt = ::qlora::testing::fixtures_dir();                                        \
  if (!var##_opt) GTEST_SKIP() << "fixtures not found: put them at ../shared/fixtures "    \
                                  "beside the checkout or set QLORA_FIXTURES";             \
  const std::filesystem::path var = *var##_opt
