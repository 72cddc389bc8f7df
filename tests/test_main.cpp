#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
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

}  // namespace qlora::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
