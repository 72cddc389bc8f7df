// Streaming GGUF writer (always version 3), in the shape of SafetensorsWriter:
//
//   GgufWriter w("model.gguf");
//   w.add_string("general.architecture", "llama");          // 1. metadata, in file order
//   w.add_u32("general.alignment", 64);                      //    (optional; default 32)
//   w.add_tensor("token_embd.weight", {576, 49152}, GgmlType::Q8_0);  // 2. tensors, in data order
//   w.write(bytes...);                                       // 3. data, any number of pieces
//   w.commit();                                              // 4. rename into place
//
// Tensor offsets are the running sum of the byte sizes, each padded to the
// alignment, and the padding after every tensor (the last one included, as
// llama.cpp and gguf-py write it) is written by the writer; so is the padding
// between the tensor infos and the data section. The header is written when
// the first data byte arrives (or at commit). Nothing appears at the
// destination on an error or when fewer bytes were written than declared.
//
// The writer knows nothing about models: keys and tensor names are the
// caller's. It refuses only what a reader (ours or llama.cpp's) would refuse:
// duplicate keys or tensor names, a value whose payload does not match its
// type, mixed or too deeply nested arrays, a general.alignment that is not a
// u32 power of two, a tensor name over 63 bytes, an invalid shape.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "io/gguf.h"

namespace qlora {

class AtomicFile;

class GgufWriter {
 public:
  explicit GgufWriter(const std::filesystem::path& dest);
  ~GgufWriter();
  GgufWriter(const GgufWriter&) = delete;
  GgufWriter& operator=(const GgufWriter&) = delete;

  // ---- 1. metadata (all of it before the first add_tensor) ----
  // Any value: integers of type U8..U64 held as uint64_t, I8..I64 as int64_t
  // (each within its type's range), F32/F64 as double, BOOL as bool, STRING
  // as std::string, ARRAY as GgufArray whose items all have type `elem`.
  void add(std::string key, GgufValue value);
  void add_u8(std::string key, uint8_t v);
  void add_i8(std::string key, int8_t v);
  void add_u16(std::string key, uint16_t v);
  void add_i16(std::string key, int16_t v);
  void add_u32(std::string key, uint32_t v);
  void add_i32(std::string key, int32_t v);
  void add_u64(std::string key, uint64_t v);
  void add_i64(std::string key, int64_t v);
  void add_f32(std::string key, float v);
  void add_f64(std::string key, double v);
  void add_bool(std::string key, bool v);
  void add_string(std::string key, std::string v);
  void add_string_array(std::string key, std::span<const std::string> v);
  // elem: an integer type (each value must fit it) / F32 or F64.
  void add_int_array(std::string key, std::span<const int64_t> v, GgufType elem = GgufType::I32);
  void add_float_array(std::string key, std::span<const double> v, GgufType elem = GgufType::F32);
  void add_float_array(std::string key, std::span<const float> v, GgufType elem = GgufType::F32);

  // ---- 2. tensors (before the first write) ----
  // ne in ggml order (ne[0] fastest). Returns the tensor's offset in the data
  // section; its size is ggml_nbytes of ne and type.
  uint64_t add_tensor(std::string name, std::vector<int64_t> ne, GgmlType type);

  // ---- 3. data ----
  // Appends bytes to the current tensor, moving to the next when it is full.
  // Throws if more bytes arrive than were declared. Any error leaves the
  // writer unusable and nothing at the destination.
  void write(std::span<const uint8_t> bytes);
  void write(const void* p, size_t n) { write(std::span<const uint8_t>(static_cast<const uint8_t*>(p), n)); }
  // Throws (and leaves nothing at dest) if fewer bytes were written than declared.
  void commit();

  uint64_t alignment() const { return alignment_; }
  // Declared so far, with offsets (relative to the data section) and sizes.
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const std::filesystem::path& dest() const { return dest_; }

 private:
  template <typename... Args>
  [[noreturn]] void error(Args&&... args);
  void check_open(const char* what) const;
  void write_header();
  void finish_full_tensors();
  void write_padding(uint64_t n);

  std::filesystem::path dest_;
  std::unique_ptr<AtomicFile> file_;
  uint64_t alignment_ = kGgufDefaultAlignment;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::map<std::string, size_t, std::less<>> keys_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> names_;
  uint64_t data_bytes_ = 0;  // the data section so far, padding included
  bool header_written_ = false;
  size_t current_ = 0;
  uint64_t written_in_current_ = 0;
};

}  // namespace qlora
