// GGUF: the model file of llama.cpp, Ollama and LM Studio.
//
// File layout (all little-endian; GGUF v2 and v3, v1 is refused):
//   "GGUF" u32 version, u64 tensor_count, u64 kv_count,
//   kv_count x (string key, u32 value_type, value),
//   tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml_type, u64 offset),
//   padding to general.alignment (default 32), then the data section;
//   strings are u64 length + bytes (no terminator); arrays are u32 element
//   type + u64 count + elements (arrays of arrays allowed).
// ne[0] is the fastest-varying dimension (ggml order): a linear weight of
// PyTorch shape [out, in] has ne = {in, out}.
//
// The reader maps the file and validates everything before anything is used,
// as strictly as the safetensors reader: magic, version, every count and
// string length inside the file (nothing is allocated from a claimed size
// that the remaining bytes cannot hold), known value and tensor types,
// tensor names unique, offsets aligned, inside the data section and not
// overlapping, element count x type size equal to each tensor's byte range.
// Errors name the file and the key or tensor and say what was expected.
// Tensor data are zero-copy views into the mapping.
//
// Decisions beyond the spec's text (each with a test in tests/test_gguf.cpp):
// - general.alignment must be a u32 power of two (1 included), as llama.cpp
//   reads it; absent, it is 32.
// - ne: 1 to 4 dimensions, none negative; 0 is accepted (an empty tensor of
//   0 bytes, which llama.cpp also loads); ne[0] a whole number of blocks.
// - The data section starts at the end of the tensor infos padded to the
//   alignment. Tensors may come in any offset order and leave holes (the
//   padding); they may not overlap or end past the file. Bytes after the last
//   tensor are allowed (writers pad it), so a file cut inside that final
//   padding still reads: every tensor is whole.
// - bool values are 0 or 1; arrays nest at most kGgufMaxArrayDepth deep;
//   keys and tensor names are unique; tensor names are at most 63 bytes (ggml's limit).
// - Memory: every metadata value becomes a GgufValue (~48 bytes), bounded by
//   the file size (each takes at least one byte), so a hostile file of N bytes
//   costs at most ~50 N bytes of memory, and one array at most
//   kGgufMaxArrayElements elements.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "core/mapped_file.h"
#include "quant/ggml_types.h"

namespace qlora {

// GGUF metadata value types, ids as in the file.
// clang-format off
enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};
// clang-format on
std::string_view gguf_type_name(GgufType t);  // "u32", "string", "array", ...
// nullopt for an id the format does not define.
std::optional<GgufType> gguf_type_from_id(uint32_t id);
bool gguf_is_integer(GgufType t);  // u8..i64 (not bool)
bool gguf_is_float(GgufType t);    // f32, f64

// Format limits shared by the reader and the writer.
inline constexpr uint32_t kGgufDefaultAlignment = 32;
// Arrays of arrays may nest this deep (an array of scalars is depth 1); the
// spec sets no limit, but unbounded nesting lets a small file exhaust the stack.
inline constexpr int kGgufMaxArrayDepth = 8;
// Elements of one metadata array. The largest real ones are vocabularies
// (at most 262,144 tokens) and their merge lists (a few times that); 2^25 is
// 8 x kMaxVocabSize (tokenizer/tokenizer.h), and caps what one array can cost
// (~48 bytes an element: 1.5 GiB) whatever the file size.
inline constexpr uint64_t kGgufMaxArrayElements = uint64_t(1) << 25;
inline constexpr size_t kGgufMaxDims = 4;
// ggml keeps tensor names in a 64-byte buffer with a terminator; llama.cpp
// refuses longer names, so neither side accepts them.
inline constexpr size_t kGgufMaxNameBytes = 63;

struct GgufValue;
struct GgufArray {
  GgufType elem = GgufType::U8;
  std::vector<GgufValue> items;
};

// One metadata value. Integers of every width are held as int64_t/uint64_t
// with their file type kept in `type`.
struct GgufValue {
  GgufType type = GgufType::U8;
  std::variant<uint64_t, int64_t, double, bool, std::string, GgufArray> v;
};

// "{576, 49152}": ne as messages print it (ggml order).
std::string gguf_ne_str(std::span<const int64_t> ne);

// Bytes of a tensor of `ne` (ggml order) and `type`. Throws qlora::Error
// (saying what is wrong, without a file or tensor name: callers add theirs)
// when there are not 1..4 dimensions, a dimension is negative, the element
// count overflows int64 or ne[0] is not a whole number of the type's blocks.
// A dimension of 0 is accepted (an empty tensor of 0 bytes), as llama.cpp does.
uint64_t gguf_tensor_nbytes(std::span<const int64_t> ne, GgmlType type);

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] fastest
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;  // relative to the data section
  uint64_t nbytes = 0;
  int64_t numel() const;
  // PyTorch order (ne reversed): [out, in] for a linear weight.
  std::vector<int64_t> shape() const;
};

class GgufFile {
 public:
  // Maps and validates; throws qlora::Error naming the file (and the key or
  // tensor at fault) for any malformed input.
  explicit GgufFile(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return map_.path(); }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }

  // Metadata, in file order and by key.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(std::string_view key) const;  // nullptr if absent

  // Typed access; each throws qlora::Error naming the file and key when the
  // key is absent or of another type ("<file>: key llama.block_count: expected
  // an unsigned integer, got string"). Integer getters accept any integer
  // type whose value fits.
  int64_t get_int(std::string_view key) const;
  double get_float(std::string_view key) const;  // f32/f64 (integers accepted)
  bool get_bool(std::string_view key) const;
  const std::string& get_string(std::string_view key) const;
  // Arrays of one element type; the string/int/float forms convert as above.
  std::vector<std::string> get_string_array(std::string_view key) const;
  std::vector<int64_t> get_int_array(std::string_view key) const;
  std::vector<double> get_float_array(std::string_view key) const;

  // In file order.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(std::string_view name) const;  // nullptr if absent
  std::span<const uint8_t> data(const GgufTensorInfo& t) const;
  // Where the data section starts in the file (tensor offsets are relative to it).
  uint64_t data_start() const { return data_start_; }
  uint64_t file_size() const { return map_.size(); }
  // Done with a tensor: drop its pages from this process (MappedFile::release).
  void release(const GgufTensorInfo& t) const { map_.release(data(t)); }

 private:
  const GgufValue& at(std::string_view key) const;  // throws when absent

  MappedFile map_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_start_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t, std::less<>> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

// True when the path names a GGUF file (by its magic; false for a folder or
// an unreadable path).
bool is_gguf_file(const std::filesystem::path& path);

}  // namespace qlora
