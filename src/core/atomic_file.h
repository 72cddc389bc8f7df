// Nothing half-written: outputs are written under a temporary name beside
// their destination and renamed into place only when complete. Destroying an
// uncommitted AtomicFile or AtomicDir removes what it wrote; what a killed
// process left ("<dest>.tmp-<pid>-<n>", pid dead) is removed by the next
// AtomicFile/AtomicDir of the same destination (remove_stale_temporaries).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string_view>

namespace qlora {

class AtomicFile {
 public:
  // Creates "<dest>.tmp-<pid>-<n>" in dest's folder. Throws qlora::Error
  // naming the path if it cannot be created.
  explicit AtomicFile(std::filesystem::path dest);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  // Throws qlora::Error naming the destination and the cause (e.g. "No space
  // left on device") on a short write.
  void write(const void* data, size_t n);
  void write(std::string_view s) { write(s.data(), s.size()); }
  size_t bytes_written() const { return written_; }
  // Rewrites already written bytes at `offset` (a header reserved earlier);
  // later write()s still append at the end.
  void overwrite(uint64_t offset, const void* data, size_t n);
  // Flushes, fsyncs and renames onto dest (replacing it).
  void commit();

  const std::filesystem::path& dest() const { return dest_; }

 private:
  std::filesystem::path dest_, tmp_;
  std::FILE* f_ = nullptr;
  size_t written_ = 0;
  bool committed_ = false;
};

// Writes a whole small file atomically.
void write_file_atomic(const std::filesystem::path& dest, std::string_view contents);

// A folder built under a temporary name ("<dest>.tmp-<pid>-<n>") and renamed
// to dest by commit(). If dest exists, commit() fails unless replace is set, in
// which case the old folder is removed only after the new one is complete.
class AtomicDir {
 public:
  AtomicDir(std::filesystem::path dest, bool replace);
  ~AtomicDir();
  AtomicDir(const AtomicDir&) = delete;
  AtomicDir& operator=(const AtomicDir&) = delete;

  // Where to write the contents while building.
  const std::filesystem::path& path() const { return tmp_; }
  const std::filesystem::path& dest() const { return dest_; }
  void commit();

 private:
  std::filesystem::path dest_, tmp_;
  bool replace_;
  bool committed_ = false;
};

// Removes the leftovers of atomic writes that were killed (SIGKILL, power
// loss): entries of dir named "<prefix>*.tmp-<pid>-<n>" whose process no
// longer exists. A live process's temporaries are left alone (it may still
// commit them). Best effort: errors are ignored.
void remove_stale_temporaries(const std::filesystem::path& dir, std::string_view prefix = "");

// A fresh unique sibling name for dest ("<dest>.tmp-<pid>-<counter>").
std::filesystem::path temp_sibling(const std::filesystem::path& dest);

}  // namespace qlora
