#include "core/atomic_file.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
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

AtomicFile::AtomicFile(fs::path dest) : dest_(std::move(dest)), tmp_(temp_sibling(dest_)) {
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
  if (std::fwrite(data, 1, n, f_) != n) fail(dest_.string(), ": write failed: ", std::strerror(errno));
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
