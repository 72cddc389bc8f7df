// Shared by the libFuzzer targets (fuzz/README.md): a scratch folder per
// process for parsers that read files, and the one rule every target checks:
// bad input may only end in qlora::Error (a message naming the file and the
// problem). Any other exception escapes and libFuzzer reports it as a crash,
// as it does for sanitizer findings, timeouts and oversized allocations.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "core/error.h"

namespace qlora::fuzz {

// /tmp/qlora-fuzz-<pid>, removed when the process exits normally.
inline const std::filesystem::path& scratch() {
  static const std::filesystem::path dir = [] {
    const char* base = std::getenv("TMPDIR");
    std::filesystem::path d = std::filesystem::path(base && *base ? base : "/tmp") /
                              ("qlora-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch(), ec);
    });
    return d;
  }();
  return dir;
}

inline void put(const std::filesystem::path& p, std::string_view bytes) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Runs f; a qlora::Error is the expected answer to bad input.
template <typename F>
void expect_only_qlora_errors(F&& f) {
  try {
    f();
  } catch (const qlora::Error&) {
  }
}

}  // namespace qlora::fuzz
