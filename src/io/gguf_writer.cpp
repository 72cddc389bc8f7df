#include "io/gguf_writer.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <utility>

#include "core/atomic_file.h"
#include "core/error.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

constexpr uint32_t kWrittenVersion = 3;

uint64_t align_up(uint64_t x, uint64_t alignment) {
  return (x + alignment - 1) / alignment * alignment;
}

// The largest value of an unsigned type / the range of a signed one.
uint64_t unsigned_max(GgufType t) {
  switch (t) {
    case GgufType::U8:
      return std::numeric_limits<uint8_t>::max();
    case GgufType::U16:
      return std::numeric_limits<uint16_t>::max();
    case GgufType::U32:
      return std::numeric_limits<uint32_t>::max();
    default:
      return std::numeric_limits<uint64_t>::max();
  }
}

std::pair<int64_t, int64_t> signed_range(GgufType t) {
  switch (t) {
    case GgufType::I8:
      return {std::numeric_limits<int8_t>::min(), std::numeric_limits<int8_t>::max()};
    case GgufType::I16:
      return {std::numeric_limits<int16_t>::min(), std::numeric_limits<int16_t>::max()};
    case GgufType::I32:
      return {std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()};
    default:
      return {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()};
  }
}

bool is_unsigned(GgufType t) {
  return t == GgufType::U8 || t == GgufType::U16 || t == GgufType::U32 || t == GgufType::U64;
}

// Throws (without a file or key: the caller adds them) when the payload of v
// does not match its type. `depth` counts the arrays enclosing v.
void check_value(const GgufValue& v, int depth) {
  const std::string_view name = gguf_type_name(v.type);
  if (!gguf_type_from_id(uint32_t(v.type))) fail("unknown value type ", uint32_t(v.type));
  if (is_unsigned(v.type)) {
    const auto* u = std::get_if<uint64_t>(&v.v);
    if (!u) fail(name, " value must be held as uint64_t");
    if (*u > unsigned_max(v.type)) fail(name, " value ", *u, " is out of range");
  } else if (gguf_is_integer(v.type)) {
    const auto* i = std::get_if<int64_t>(&v.v);
    if (!i) fail(name, " value must be held as int64_t");
    const auto [lo, hi] = signed_range(v.type);
    if (*i < lo || *i > hi) fail(name, " value ", *i, " is out of range");
  } else if (gguf_is_float(v.type)) {
    const auto* d = std::get_if<double>(&v.v);
    if (!d) fail(name, " value must be held as double");
    // Converting a finite double beyond float's range is undefined behaviour.
    if (v.type == GgufType::F32 && std::isfinite(*d) && std::fabs(*d) > std::numeric_limits<float>::max())
      fail("f32 value ", *d, " is out of range");
  } else if (v.type == GgufType::BOOL) {
    if (!std::holds_alternative<bool>(v.v)) fail("bool value must be held as bool");
  } else if (v.type == GgufType::STRING) {
    if (!std::holds_alternative<std::string>(v.v)) fail("string value must be held as std::string");
  } else {
    const auto* a = std::get_if<GgufArray>(&v.v);
    if (!a) fail("array value must be held as GgufArray");
    if (depth + 1 > kGgufMaxArrayDepth) fail("arrays nested more than ", kGgufMaxArrayDepth, " deep");
    if (!gguf_type_from_id(uint32_t(a->elem))) fail("unknown array element type ", uint32_t(a->elem));
    for (size_t i = 0; i < a->items.size(); ++i) {
      const GgufValue& item = a->items[i];
      if (item.type != a->elem)
        fail("array of ", gguf_type_name(a->elem), " has element ", i, " of type ",
             gguf_type_name(item.type));
      try {
        check_value(item, depth + 1);
      } catch (const Error& e) {
        fail("element ", i, ": ", e.what());
      }
    }
  }
}

void put_le(std::string& out, uint64_t v, unsigned n) {
  for (unsigned i = 0; i < n; ++i) out.push_back(char(uint8_t(v >> (8 * i))));
}

void put_string(std::string& out, std::string_view s) {
  put_le(out, s.size(), 8);
  out.append(s);
}

// v has passed check_value.
void put_value(std::string& out, const GgufValue& v) {
  switch (v.type) {
    case GgufType::U8:
      put_le(out, std::get<uint64_t>(v.v), 1);
      break;
    case GgufType::U16:
      put_le(out, std::get<uint64_t>(v.v), 2);
      break;
    case GgufType::U32:
      put_le(out, std::get<uint64_t>(v.v), 4);
      break;
    case GgufType::U64:
      put_le(out, std::get<uint64_t>(v.v), 8);
      break;
    case GgufType::I8:
      put_le(out, uint64_t(std::get<int64_t>(v.v)), 1);
      break;
    case GgufType::I16:
      put_le(out, uint64_t(std::get<int64_t>(v.v)), 2);
      break;
    case GgufType::I32:
      put_le(out, uint64_t(std::get<int64_t>(v.v)), 4);
      break;
    case GgufType::I64:
      put_le(out, uint64_t(std::get<int64_t>(v.v)), 8);
      break;
    case GgufType::F32:
      put_le(out, std::bit_cast<uint32_t>(float(std::get<double>(v.v))), 4);
      break;
    case GgufType::F64:
      put_le(out, std::bit_cast<uint64_t>(std::get<double>(v.v)), 8);
      break;
    case GgufType::BOOL:
      put_le(out, std::get<bool>(v.v) ? 1 : 0, 1);
      break;
    case GgufType::STRING:
      put_string(out, std::get<std::string>(v.v));
      break;
    case GgufType::ARRAY: {
      const auto& a = std::get<GgufArray>(v.v);
      put_le(out, uint32_t(a.elem), 4);
      put_le(out, a.items.size(), 8);
      for (const GgufValue& item : a.items) put_value(out, item);
      break;
    }
  }
}

// An array value with room for n items, built in place (moving a GgufArray
// into a variant trips GCC 12's -Wmaybe-uninitialized).
GgufValue empty_array(GgufType elem, size_t n) {
  GgufValue v;
  v.type = GgufType::ARRAY;
  GgufArray& a = v.v.emplace<GgufArray>();
  a.elem = elem;
  a.items.reserve(n);
  return v;
}

// Built in place for the same reason.
template <typename T>
void append(std::vector<GgufValue>& items, GgufType type, const T& payload) {
  GgufValue& item = items.emplace_back();
  item.type = type;
  item.v = payload;
}

}  // namespace

GgufWriter::GgufWriter(const fs::path& dest) : dest_(dest), file_(std::make_unique<AtomicFile>(dest)) {}

GgufWriter::~GgufWriter() = default;

template <typename... Args>
void GgufWriter::error(Args&&... args) {
  fail(dest_.string(), ": ", std::forward<Args>(args)...);
}

void GgufWriter::check_open(const char* what) const {
  if (!file_) fail(dest_.string(), ": ", what, " after commit or after an earlier error");
}

// ------------------------------------------------------------- metadata ----

void GgufWriter::add(std::string key, GgufValue value) {
  check_open("metadata added");
  if (header_written_ || !tensors_.empty())
    error("key ", key, ": metadata must be added before the first tensor");
  if (keys_.count(key)) error("key ", key, " is added twice");
  try {
    check_value(value, 0);
  } catch (const Error& e) {
    error("key ", key, ": ", e.what());
  }
  if (key == "general.alignment") {
    // As llama.cpp reads it: a u32, a power of two.
    if (value.type != GgufType::U32)
      error("key general.alignment: expected a u32, got ", gguf_type_name(value.type));
    const uint64_t a = std::get<uint64_t>(value.v);
    if (!std::has_single_bit(a)) error("key general.alignment: alignment ", a, " is not a power of two");
    alignment_ = a;
  }
  keys_.emplace(key, kv_.size());
  kv_.emplace_back(std::move(key), std::move(value));
}

void GgufWriter::add_u8(std::string key, uint8_t v) {
  add(std::move(key), {GgufType::U8, uint64_t(v)});
}
void GgufWriter::add_i8(std::string key, int8_t v) {
  add(std::move(key), {GgufType::I8, int64_t(v)});
}
void GgufWriter::add_u16(std::string key, uint16_t v) {
  add(std::move(key), {GgufType::U16, uint64_t(v)});
}
void GgufWriter::add_i16(std::string key, int16_t v) {
  add(std::move(key), {GgufType::I16, int64_t(v)});
}
void GgufWriter::add_u32(std::string key, uint32_t v) {
  add(std::move(key), {GgufType::U32, uint64_t(v)});
}
void GgufWriter::add_i32(std::string key, int32_t v) {
  add(std::move(key), {GgufType::I32, int64_t(v)});
}
void GgufWriter::add_u64(std::string key, uint64_t v) {
  add(std::move(key), {GgufType::U64, v});
}
void GgufWriter::add_i64(std::string key, int64_t v) {
  add(std::move(key), {GgufType::I64, v});
}
void GgufWriter::add_f32(std::string key, float v) {
  add(std::move(key), {GgufType::F32, double(v)});
}
void GgufWriter::add_f64(std::string key, double v) {
  add(std::move(key), {GgufType::F64, v});
}
void GgufWriter::add_bool(std::string key, bool v) {
  add(std::move(key), {GgufType::BOOL, v});
}
void GgufWriter::add_string(std::string key, std::string v) {
  add(std::move(key), {GgufType::STRING, std::move(v)});
}

void GgufWriter::add_string_array(std::string key, std::span<const std::string> v) {
  GgufValue value = empty_array(GgufType::STRING, v.size());
  auto& items = std::get<GgufArray>(value.v).items;
  for (const std::string& s : v) append(items, GgufType::STRING, s);
  add(std::move(key), std::move(value));
}

void GgufWriter::add_int_array(std::string key, std::span<const int64_t> v, GgufType elem) {
  if (!gguf_is_integer(elem))
    error("key ", key, ": an integer array needs an integer element type, got ", gguf_type_name(elem));
  GgufValue value = empty_array(elem, v.size());
  auto& items = std::get<GgufArray>(value.v).items;
  for (int64_t x : v) {
    // Unsigned elements are held as uint64_t; a negative one is out of range.
    if (is_unsigned(elem) && x < 0)
      error("key ", key, ": element ", items.size(), ": ", gguf_type_name(elem), " value ", x,
            " is out of range");
    if (is_unsigned(elem))
      append(items, elem, uint64_t(x));
    else
      append(items, elem, x);
  }
  add(std::move(key), std::move(value));
}

void GgufWriter::add_float_array(std::string key, std::span<const double> v, GgufType elem) {
  if (!gguf_is_float(elem))
    error("key ", key, ": a float array needs element type f32 or f64, got ", gguf_type_name(elem));
  GgufValue value = empty_array(elem, v.size());
  auto& items = std::get<GgufArray>(value.v).items;
  for (double x : v) append(items, elem, x);
  add(std::move(key), std::move(value));
}

void GgufWriter::add_float_array(std::string key, std::span<const float> v, GgufType elem) {
  const std::vector<double> d(v.begin(), v.end());
  add_float_array(std::move(key), std::span<const double>(d), elem);
}

// -------------------------------------------------------------- tensors ----

uint64_t GgufWriter::add_tensor(std::string name, std::vector<int64_t> ne, GgmlType type) {
  check_open("tensor added");
  if (header_written_) error("tensor ", name, ": tensors must be declared before the first write");
  if (names_.count(name)) error("tensor ", name, " is declared twice");
  if (name.size() > kGgufMaxNameBytes)
    error("tensor ", name, ": name of ", name.size(), " bytes is longer than ggml's limit of ",
          kGgufMaxNameBytes);
  if (!ggml_type_traits(uint32_t(type))) error("tensor ", name, ": unknown ggml type id ", uint32_t(type));
  GgufTensorInfo t;
  try {
    t.nbytes = gguf_tensor_nbytes(ne, type);
  } catch (const Error& e) {
    error("tensor ", name, ": ", e.what());
  }
  uint64_t end = 0;
  if (__builtin_add_overflow(data_bytes_, align_up(t.nbytes, alignment_), &end) || t.nbytes > end)
    error("tensor ", name, ": the data section would exceed 64 bits");
  t.name = std::move(name);
  t.ne = std::move(ne);
  t.type = type;
  t.offset = data_bytes_;
  data_bytes_ = end;
  names_.emplace(t.name, tensors_.size());
  tensors_.push_back(std::move(t));
  return tensors_.back().offset;
}

// ----------------------------------------------------------------- data ----

void GgufWriter::write_header() {
  std::string h;
  h.append("GGUF", 4);
  put_le(h, kWrittenVersion, 4);
  put_le(h, tensors_.size(), 8);
  put_le(h, kv_.size(), 8);
  for (const auto& [key, value] : kv_) {
    put_string(h, key);
    put_le(h, uint32_t(value.type), 4);
    put_value(h, value);
  }
  for (const GgufTensorInfo& t : tensors_) {
    put_string(h, t.name);
    put_le(h, t.ne.size(), 4);
    for (int64_t d : t.ne) put_le(h, uint64_t(d), 8);
    put_le(h, uint32_t(t.type), 4);
    put_le(h, t.offset, 8);
  }
  h.append(align_up(h.size(), alignment_) - h.size(), '\0');
  file_->write(h);
  header_written_ = true;
}

void GgufWriter::write_padding(uint64_t n) {
  static constexpr char kZeros[256] = {};
  while (n > 0) {
    const uint64_t k = std::min<uint64_t>(n, sizeof(kZeros));
    file_->write(kZeros, size_t(k));
    n -= k;
  }
}

// Pads after each tensor whose bytes are all written and moves past it (an
// empty tensor is full at once).
void GgufWriter::finish_full_tensors() {
  while (current_ < tensors_.size() && written_in_current_ == tensors_[current_].nbytes) {
    const uint64_t n = tensors_[current_].nbytes;
    write_padding(align_up(n, alignment_) - n);
    ++current_;
    written_in_current_ = 0;
  }
}

void GgufWriter::write(std::span<const uint8_t> bytes) {
  check_open("write");
  // Any failure drops the temporary file: a half-written model must not be
  // committable.
  try {
    if (!header_written_) write_header();
    while (!bytes.empty()) {
      finish_full_tensors();
      if (current_ == tensors_.size()) error(bytes.size(), " bytes more than the declared tensors hold");
      const uint64_t take = std::min<uint64_t>(bytes.size(), tensors_[current_].nbytes - written_in_current_);
      file_->write(bytes.data(), size_t(take));
      written_in_current_ += take;
      bytes = bytes.subspan(size_t(take));
    }
  } catch (...) {
    file_.reset();
    throw;
  }
}

void GgufWriter::commit() {
  check_open("commit");
  try {
    if (!header_written_) write_header();
    finish_full_tensors();
    if (current_ != tensors_.size()) {
      uint64_t declared = 0, written = written_in_current_;
      for (size_t i = 0; i < tensors_.size(); ++i) {
        declared += tensors_[i].nbytes;
        if (i < current_) written += tensors_[i].nbytes;
      }
      error("only ", written, " of ", declared, " declared tensor bytes were written (tensor ",
            tensors_[current_].name, " is incomplete)");
    }
    file_->commit();
  } catch (...) {
    file_.reset();
    throw;
  }
  file_.reset();
}

}  // namespace qlora
