// A read-only memory map of a whole file (RAII). Tensors read from it are
// views into the mapping: nothing is copied until a consumer converts them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>

namespace qlora {

class MappedFile {
 public:
  // Throws qlora::Error naming the path and the OS error if the file cannot be
  // opened or mapped. An empty file maps to an empty span.
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  // Drops the pages of a sub-range from this process (they stay in the page
  // cache and are read back if touched again): a stream over a file larger
  // than memory keeps its resident set to what it is working on.
  void release(std::span<const uint8_t> range) const;
  const std::filesystem::path& path() const { return path_; }
  size_t size() const { return size_; }

 private:
  std::filesystem::path path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace qlora
