// safetensors: the weight format of Hugging Face checkpoints.
//
// File layout: 8-byte little-endian header length N, then N bytes of JSON
//   {"<name>": {"dtype": "BF16", "shape": [d0, d1], "data_offsets": [begin, end]},
//    ..., "__metadata__": {"k": "v"}}
// then the data section; offsets are relative to the start of the data section.
//
// The reader maps the file and validates the whole header before anything is
// used: JSON well formed, header length sane, every dtype known, shape x dtype
// size equal to the byte range, ranges inside the file and not overlapping.
// Tensor data are zero-copy views into the mapping.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"
#include "core/mapped_file.h"

namespace qlora {

using Shape = std::vector<int64_t>;

int64_t shape_numel(const Shape& s);
std::string shape_str(const Shape& s);  // "[4096, 11008]"

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  uint64_t begin = 0;  // byte offsets relative to the data section
  uint64_t end = 0;
  uint64_t nbytes() const { return end - begin; }
  int64_t numel() const { return shape_numel(shape); }
};

class SafetensorsFile {
 public:
  // Maps and validates. Throws qlora::Error naming the file (and the tensor,
  // where one is at fault) for any malformed input.
  explicit SafetensorsFile(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return map_.path(); }
  // In file order: sorted by begin offset (the JSON itself is usually sorted by name).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view name) const;  // nullptr if absent
  std::span<const uint8_t> data(const TensorInfo& t) const;
  // Done with a tensor: drop its pages from this process (MappedFile::release).
  void release(const TensorInfo& t) const { map_.release(data(t)); }
  void release(std::span<const uint8_t> bytes) const { map_.release(bytes); }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return map_.size(); }

 private:
  MappedFile map_;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a model: a single .safetensors file, or a folder holding
// model.safetensors or model.safetensors.index.json (sharded). A name present
// in two shards, a shard listed in the index but missing, or a tensor listed
// in the index but absent from its shard are errors naming the file.
class SafetensorsModel {
 public:
  explicit SafetensorsModel(const std::filesystem::path& dir_or_file);

  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  // Sorted by name.
  const std::vector<std::string>& names() const { return names_; }
  const Entry* find(std::string_view name) const;  // nullptr if absent
  // Throws qlora::Error naming the model and tensor if absent.
  const Entry& at(std::string_view name) const;
  std::span<const uint8_t> data(std::string_view name) const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  uint64_t total_bytes() const;  // sum of tensor byte sizes
  const std::filesystem::path& source() const { return source_; }

 private:
  std::filesystem::path source_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry, std::less<>> entries_;
  std::vector<std::string> names_;
};

// Streaming writer. The tensors are declared up front (so the header can be
// written first), then their bytes are appended in declaration order, in as
// many pieces as the caller likes. The file appears at `dest` only on commit().
struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  uint64_t nbytes() const { return uint64_t(shape_numel(shape)) * dtype_size(dtype); }
};

// The JSON header of a file holding `specs` contiguously in that order (data
// offsets from 0), with "__metadata__" if metadata is non-empty; unpadded.
// Throws qlora::Error for a duplicate or reserved name or an invalid shape.
std::string safetensors_header_json(const std::vector<TensorSpec>& specs,
                                    const std::map<std::string, std::string>& metadata = {});

class AtomicFile;

class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::filesystem::path& dest, std::vector<TensorSpec> specs,
                    const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Appends bytes to the current tensor, moving to the next when it is full.
  // Throws if more bytes arrive than were declared.
  void write(std::span<const uint8_t> bytes);
  void write(const void* p, size_t n) { write(std::span<const uint8_t>(static_cast<const uint8_t*>(p), n)); }
  // Throws (and leaves nothing at dest) if fewer bytes were written than declared.
  void commit();

 private:
  std::unique_ptr<AtomicFile> file_;
  std::vector<TensorSpec> specs_;
  size_t current_ = 0;
  uint64_t written_in_current_ = 0;
};

// One tensor held in memory, for small files and tests.
struct OwnedTensor {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  std::vector<uint8_t> bytes;
};
void save_safetensors(const std::filesystem::path& dest, const std::vector<OwnedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// model.safetensors.index.json: {"metadata": {"total_size": N}, "weight_map": {name: file}}
void write_safetensors_index(const std::filesystem::path& dest, uint64_t total_size,
                             const std::map<std::string, std::string>& weight_map);

}  // namespace qlora
