#include "core/atomic_file.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <system_error>

#include "core/error.h"

namespace qlora {

namespace fs = std::filesystem;

fs::path temp_sibling(const fs::path& dest) {
  static std::atomic<unsigned> counter{0};
  fs::path d = dest;
  if (!d.has_filename()) d = d.parent_path();  // "out/" -> "out"
  return fs::path(str(d.string(), ".tmp-", ::getpid(), "-", counter++));
}

namespace {

// Test hook of the chaos test (tests/test_chaos.cpp, docs/reliability.md):
// QLORA_TEST_KILL_WRITING="<substring>:<bytes>" makes the process SIGKILL
// itself once an atomic write whose destination contains <substring> has
// written <bytes> bytes, so a kill lands at an exact moment inside a
// checkpoint, cache or adapter write, which an outside timer rarely hits.
struct KillPoint {
  std::string where;
  size_t bytes = 0;
};

const std::optional<KillPoint>& kill_point() {
  static const std::optional<KillPoint> k = []() -> std::optional<KillPoint> {
    const char* v = std::getenv("QLORA_TEST_KILL_WRITING");
    if (!v) return std::nullopt;
    const std::string s = v;
    const size_t colon = s.rfind(':');
    if (colon == std::string::npos) return std::nullopt;
    return KillPoint{s.substr(0, colon), size_t(std::strtoull(s.c_str() + colon + 1, nullptr, 10))};
  }();
  return k;
}

// The part of n bytes to write before dying, or n when this write is not the one.
size_t bytes_before_kill(const fs::path& dest, size_t written, size_t n) {
  const auto& k = kill_point();
  if (!k || dest.string().find(k->where) == std::string::npos || written + n < k->bytes) return n;
  return k->bytes > written ? k->bytes - written : 0;
}

}  // namespace

void remove_stale_temporaries(const fs::path& dir, std::string_view prefix) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const size_t at = name.rfind(".tmp-");
    if (at == std::string::npos || name.compare(0, prefix.size(), prefix) != 0) continue;
    // "<pid>-<n>" and nothing else after ".tmp-": ours, not a user's file.
    char* end = nullptr;
    const long pid = std::strtol(name.c_str() + at + 5, &end, 10);
    if (pid <= 0 || *end != '-' || end[1] == '\0') continue;
    bool digits = true;
    for (const char* c = end + 1; *c; ++c) digits = digits && *c >= '0' && *c <= '9';
    if (!digits || pid == long(::getpid())) continue;
    // Alive (or not ours to signal): an unfinished write that may yet finish.
    if (::kill(pid_t(pid), 0) == 0 || errno != ESRCH) continue;
    std::error_code rec;
    fs::remove_all(e.path(), rec);
  }
}

namespace {

// The temporaries of earlier, killed writes of the same destination.
void remove_stale_siblings(const fs::path& dest) {
  if (dest.has_filename()) remove_stale_temporaries(dest.parent_path().empty() ? "." : dest.parent_path(),
                                                    dest.filename().string() + ".tmp-");
}

}  // namespace

AtomicFile::AtomicFile(fs::path dest) : dest_(std::move(dest)), tmp_(temp_sibling(dest_)) {
  remove_stale_siblings(dest_);
  f_ = std::fopen(tmp_.c_str(), "wb");
  if (!f_) fail(dest_.string(), ": cannot create: ", std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (f_) std::fclose(f_);
  if (!committed_) {
    std::error_code ec;
    fs::remove(tmp_, ec);
  }
}

void AtomicFile::write(const void* data, size_t n) {
  if (!f_) fail(dest_.string(), ": write after commit");
  if (n == 0) return;
  const size_t now = bytes_before_kill(dest_, written_, n);
  if (std::fwrite(data, 1, now, f_) != now) fail(dest_.string(), ": write failed: ", std::strerror(errno));
  if (now < n) {
    std::fflush(f_);
    ::raise(SIGKILL);
  }
  written_ += n;
}

void AtomicFile::overwrite(uint64_t offset, const void* data, size_t n) {
  if (!f_) fail(dest_.string(), ": write after commit");
  if (offset + n > written_) fail(dest_.string(), ": overwrite past the end of what was written");
  const bool ok = std::fseek(f_, long(offset), SEEK_SET) == 0 && std::fwrite(data, 1, n, f_) == n &&
                  std::fseek(f_, 0, SEEK_END) == 0;
  if (!ok) fail(dest_.string(), ": write failed: ", std::strerror(errno));
}

void AtomicFile::commit() {
  if (!f_) fail(dest_.string(), ": committed twice");
  const bool ok = std::fflush(f_) == 0 && ::fsync(::fileno(f_)) == 0;
  const int e = errno;
  const bool closed = std::fclose(f_) == 0;
  f_ = nullptr;
  if (!ok || !closed) fail(dest_.string(), ": write failed: ", std::strerror(e));
  std::error_code ec;
  fs::rename(tmp_, dest_, ec);
  if (ec) fail(dest_.string(), ": cannot rename temporary file into place: ", ec.message());
  committed_ = true;
}

void write_file_atomic(const fs::path& dest, std::string_view contents) {
  AtomicFile f(dest);
  f.write(contents);
  f.commit();
}

AtomicDir::AtomicDir(fs::path dest, bool replace)
    : dest_(std::move(dest)), tmp_(temp_sibling(dest_)), replace_(replace) {
  if (!dest_.has_filename()) dest_ = dest_.parent_path();
  remove_stale_siblings(dest_);
  std::error_code ec;
  if (fs::exists(dest_, ec) && !replace_)
    fail(dest_.string(), ": already exists (remove it, choose another output, or pass --force)");
  if (dest_.has_parent_path()) fs::create_directories(dest_.parent_path(), ec);
  if (!fs::create_directory(tmp_, ec) || ec)
    fail(dest_.string(), ": cannot create temporary folder ", tmp_.string(), ": ", ec.message());
}

AtomicDir::~AtomicDir() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
}

void AtomicDir::commit() {
  std::error_code ec;
  fs::path old;
  if (fs::exists(dest_, ec)) {
    if (!replace_) fail(dest_.string(), ": already exists");
    // One step where the filesystem can: swap the two folders, so a kill
    // leaves either the old folder or the new one at dest, never neither.
    if (::renameat2(AT_FDCWD, tmp_.c_str(), AT_FDCWD, dest_.c_str(), RENAME_EXCHANGE) == 0) {
      committed_ = true;
      fs::remove_all(tmp_, ec);  // now the old folder
      return;
    }
    old = temp_sibling(dest_);
    fs::rename(dest_, old, ec);
    if (ec) fail(dest_.string(), ": cannot move the old folder aside: ", ec.message());
  }
  fs::rename(tmp_, dest_, ec);
  if (ec) fail(dest_.string(), ": cannot rename the finished folder into place: ", ec.message());
  committed_ = true;
  if (!old.empty()) fs::remove_all(old, ec);
}

}  // namespace qlora
