// Shared helpers for the test suite: where the fixtures are, scratch folders.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <optional>
#include <string>

namespace qlora::testing {

// ../shared/fixtures beside the checkout, or $QLORA_FIXTURES; nullopt if neither exists.
std::optional<std::filesystem::path> fixtures_dir();

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

}  // namespace qlora::testing

// Skips the current test with a message naming what is missing.
#define QLORA_REQUIRE_FIXTURES(var)                                                         \
  auto var##_opt = ::qlora::testing::fixtures_dir();                                        \
  if (!var##_opt) GTEST_SKIP() << "fixtures not found: put them at ../shared/fixtures "    \
                                  "beside the checkout or set QLORA_FIXTURES";             \
  const std::filesystem::path var = *var##_opt
