#include "io/gguf.h"

#include <algorithm>
#include <bit>
#include <fstream>
#include <limits>
#include <numeric>
#include <system_error>
#include <utility>

#include "core/error.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
constexpr uint32_t kLastGgufType = uint32_t(GgufType::F64);

// The fewest bytes one value of type t takes in the file. A claimed count is
// checked against remaining / this before anything is allocated for it.
uint64_t min_encoded_bytes(GgufType t) {
  switch (t) {
    case GgufType::U8:
    case GgufType::I8:
    case GgufType::BOOL:
      return 1;
    case GgufType::U16:
    case GgufType::I16:
      return 2;
    case GgufType::U32:
    case GgufType::I32:
    case GgufType::F32:
      return 4;
    case GgufType::U64:
    case GgufType::I64:
    case GgufType::F64:
      return 8;
    case GgufType::STRING:
      return 8;  // the length
    case GgufType::ARRAY:
      return 12;  // element type + count
  }
  return 1;
}

// A key: string length + 1 byte of name at least, value type, 1-byte value.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;
// A tensor info: name length, n_dims, one ne, ggml type, offset.
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;

uint64_t align_up(uint64_t x, uint64_t alignment) {
  return (x + alignment - 1) / alignment * alignment;
}

std::string describe(const GgufValue& v) {
  if (v.type != GgufType::ARRAY) return std::string(gguf_type_name(v.type));
  const auto* a = std::get_if<GgufArray>(&v.v);
  return a ? str("array of ", gguf_type_name(a->elem)) : "array";
}

// Reads the header region of the mapped file: little-endian scalars, strings
// and values, each checked against the bytes that remain. Errors name the
// file and what is being read (the key or tensor, set by the caller).
class Parser {
 public:
  Parser(std::span<const uint8_t> bytes, std::string file) : b_(bytes), file_(std::move(file)) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return b_.size() - pos_; }
  void set_context(std::string ctx) { ctx_ = std::move(ctx); }

  template <typename... Args>
  [[noreturn]] void error(Args&&... args) const {
    fail(file_, ": ", ctx_, ": ", std::forward<Args>(args)...);
  }

  // An n-byte little-endian unsigned integer (n <= 8).
  uint64_t le(unsigned n, const char* what) {
    need(n, what);
    uint64_t v = 0;
    for (unsigned i = n; i-- > 0;) v = (v << 8) | b_[pos_ + i];
    pos_ += n;
    return v;
  }

  std::string_view string(const char* what) {
    const uint64_t n = le(8, what);
    if (n > remaining())
      error(what, " of ", n, " bytes at offset ", pos_ - 8, " runs past the end of the file (", remaining(),
            " bytes remain)");
    const std::string_view s(reinterpret_cast<const char*>(b_.data() + pos_), size_t(n));
    pos_ += n;
    return s;
  }

  GgufType type(const char* what) {
    const uint32_t id = uint32_t(le(4, what));
    const auto t = gguf_type_from_id(id);
    if (!t) error("unknown ", what, " ", id, " (expected 0 to ", kLastGgufType, ")");
    return *t;
  }

  // `depth` is the number of arrays that enclose this value.
  GgufValue value(GgufType t, int depth) {
    GgufValue v;
    v.type = t;
    switch (t) {
      case GgufType::U8:
        v.v = le(1, "u8 value");
        break;
      case GgufType::U16:
        v.v = le(2, "u16 value");
        break;
      case GgufType::U32:
        v.v = le(4, "u32 value");
        break;
      case GgufType::U64:
        v.v = le(8, "u64 value");
        break;
      case GgufType::I8:
        v.v = int64_t(int8_t(le(1, "i8 value")));
        break;
      case GgufType::I16:
        v.v = int64_t(int16_t(le(2, "i16 value")));
        break;
      case GgufType::I32:
        v.v = int64_t(int32_t(le(4, "i32 value")));
        break;
      case GgufType::I64:
        v.v = int64_t(le(8, "i64 value"));
        break;
      case GgufType::F32:
        v.v = double(std::bit_cast<float>(uint32_t(le(4, "f32 value"))));
        break;
      case GgufType::F64:
        v.v = std::bit_cast<double>(le(8, "f64 value"));
        break;
      case GgufType::BOOL: {
        // Any other byte is corruption, not a truth value.
        const uint64_t b = le(1, "bool value");
        if (b > 1) error("bool value ", b, " at offset ", pos_ - 1, ", expected 0 or 1");
        v.v = b == 1;
        break;
      }
      case GgufType::STRING:
        v.v = std::string(string("string"));
        break;
      case GgufType::ARRAY:
        v.v = array(depth + 1);
        break;
    }
    return v;
  }

 private:
  GgufArray array(int depth) {
    if (depth > kGgufMaxArrayDepth) error("arrays nested more than ", kGgufMaxArrayDepth, " deep");
    GgufArray a;
    a.elem = type("array element type");
    const uint64_t count = le(8, "array length");
    const uint64_t min = min_encoded_bytes(a.elem);
    if (count > remaining() / min)
      error("array of ", count, " ", gguf_type_name(a.elem), " values needs at least ", count, " x ", min,
            " bytes but only ", remaining(), " remain in the file");
    if (count > kGgufMaxArrayElements)
      error("array of ", count, " values; a metadata array may have at most ", kGgufMaxArrayElements);
    a.items.reserve(size_t(count));
    for (uint64_t i = 0; i < count; ++i) a.items.push_back(value(a.elem, depth));
    return a;
  }

  void need(uint64_t n, const char* what) {
    if (n > remaining())
      error("file ends at offset ", b_.size(), " in the middle of the ", what, " (", n, " bytes at offset ",
            pos_, ")");
  }

  std::span<const uint8_t> b_;
  std::string file_;
  std::string ctx_ = "header";
  uint64_t pos_ = 0;
};

}  // namespace

// ------------------------------------------------------------- helpers ----

std::string_view gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::U8:
      return "u8";
    case GgufType::I8:
      return "i8";
    case GgufType::U16:
      return "u16";
    case GgufType::I16:
      return "i16";
    case GgufType::U32:
      return "u32";
    case GgufType::I32:
      return "i32";
    case GgufType::F32:
      return "f32";
    case GgufType::BOOL:
      return "bool";
    case GgufType::STRING:
      return "string";
    case GgufType::ARRAY:
      return "array";
    case GgufType::U64:
      return "u64";
    case GgufType::I64:
      return "i64";
    case GgufType::F64:
      return "f64";
  }
  return "unknown";
}

std::optional<GgufType> gguf_type_from_id(uint32_t id) {
  if (id > kLastGgufType) return std::nullopt;
  return GgufType(id);
}

bool gguf_is_integer(GgufType t) {
  switch (t) {
    case GgufType::U8:
    case GgufType::I8:
    case GgufType::U16:
    case GgufType::I16:
    case GgufType::U32:
    case GgufType::I32:
    case GgufType::U64:
    case GgufType::I64:
      return true;
    default:
      return false;
  }
}

bool gguf_is_float(GgufType t) {
  return t == GgufType::F32 || t == GgufType::F64;
}

std::string gguf_ne_str(std::span<const int64_t> ne) {
  std::string r = "{";
  for (size_t i = 0; i < ne.size(); ++i) r += (i ? ", " : "") + std::to_string(ne[i]);
  return r + "}";
}

uint64_t gguf_tensor_nbytes(std::span<const int64_t> ne, GgmlType type) {
  if (ne.empty() || ne.size() > kGgufMaxDims) fail(ne.size(), " dimensions, expected 1 to ", kGgufMaxDims);
  int64_t n = 1;
  for (int64_t d : ne) {
    if (d < 0) fail("ne ", gguf_ne_str(ne), " has a negative dimension");
    if (__builtin_mul_overflow(n, d, &n)) fail("ne ", gguf_ne_str(ne), ": element count overflows 64 bits");
  }
  const GgmlTypeTraits tr = ggml_traits(type);
  // ggml lays rows out as whole blocks, so a row length that splits a block
  // cannot be stored, whatever the total count.
  if (ne[0] % tr.block_values != 0)
    fail("ne[0] = ", ne[0], " is not a multiple of the ", tr.block_values, "-value blocks of ", tr.name);
  const auto bytes = ggml_nbytes(type, n);
  if (!bytes) fail("ne ", gguf_ne_str(ne), " of ", tr.name, ": byte size overflows 64 bits");
  return *bytes;
}

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;  // validated not to overflow when read or declared
  return n;
}

std::vector<int64_t> GgufTensorInfo::shape() const {
  return {ne.rbegin(), ne.rend()};
}

// ---------------------------------------------------------------- reader ----

namespace {

void read_magic_and_version(Parser& p, uint64_t size, uint32_t& version) {
  if (size < 4) p.error("file is ", size, " bytes, too short for the GGUF magic");
  const uint64_t magic = p.le(4, "magic");
  uint8_t m[4];
  for (int i = 0; i < 4; ++i) m[i] = uint8_t(magic >> (8 * i));
  if (!std::equal(m, m + 4, kMagic)) {
    std::string shown;
    for (uint8_t c : m) shown += (c >= 0x20 && c < 0x7f) ? char(c) : '?';
    p.error("not a GGUF file: magic is \"", shown, "\", expected \"GGUF\"");
  }
  version = uint32_t(p.le(4, "version"));
  if (version == 1)
    p.error(
        "GGUF version 1 is not supported (it uses 32-bit counts); expected version 2 or 3: "
        "convert the model again with a current llama.cpp");
  if (version != 2 && version != 3) {
    // A big-endian v3 file reads as 0x03000000 here.
    const bool swapped = __builtin_bswap32(version) == 2 || __builtin_bswap32(version) == 3;
    p.error("unsupported GGUF version ", version, swapped ? " (a big-endian file?)" : "",
            ", expected 2 or 3");
  }
}

}  // namespace

GgufFile::GgufFile(const fs::path& file) : map_(file) {
  const std::string path = map_.path().string();
  const auto bytes = map_.bytes();
  Parser p(bytes, path);
  read_magic_and_version(p, bytes.size(), version_);

  const uint64_t n_tensors = p.le(8, "tensor count");
  const uint64_t n_kv = p.le(8, "key/value count");
  if (n_kv > p.remaining() / kMinKvBytes)
    p.error("key/value count ", n_kv, " cannot fit in the ", p.remaining(),
            " bytes that remain (each takes at least ", kMinKvBytes, ")");
  if (n_tensors > p.remaining() / kMinTensorInfoBytes)
    p.error("tensor count ", n_tensors, " cannot fit in the ", p.remaining(),
            " bytes that remain (each tensor info takes at least ", kMinTensorInfoBytes, ")");

  kv_.reserve(size_t(n_kv));
  for (uint64_t i = 0; i < n_kv; ++i) {
    p.set_context(str("key #", i));
    std::string key(p.string("key"));
    p.set_context(str("key ", key));
    const GgufType t = p.type("value type");
    GgufValue v = p.value(t, 0);
    if (!kv_index_.emplace(key, kv_.size()).second) p.error("appears twice in the metadata");
    kv_.emplace_back(std::move(key), std::move(v));
  }

  if (const GgufValue* a = find("general.alignment")) {
    p.set_context("key general.alignment");
    // llama.cpp reads it as a u32 only; another type would mean another layout.
    if (a->type != GgufType::U32) p.error("expected a u32, got ", describe(*a));
    const uint64_t n = std::get<uint64_t>(a->v);
    if (n == 0 || !std::has_single_bit(n)) p.error("alignment ", n, " is not a power of two");
    alignment_ = n;
  }

  tensors_.reserve(size_t(n_tensors));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    p.set_context(str("tensor info #", i));
    GgufTensorInfo t;
    t.name = std::string(p.string("tensor name"));
    p.set_context(str("tensor ", t.name));
    if (t.name.size() > kGgufMaxNameBytes)
      p.error("name of ", t.name.size(), " bytes is longer than ggml's limit of ", kGgufMaxNameBytes);
    const uint64_t n_dims = p.le(4, "n_dims");
    if (n_dims < 1 || n_dims > kGgufMaxDims) p.error("n_dims is ", n_dims, ", expected 1 to ", kGgufMaxDims);
    for (uint64_t d = 0; d < n_dims; ++d) t.ne.push_back(int64_t(p.le(8, "ne")));
    const uint32_t type_id = uint32_t(p.le(4, "ggml type"));
    const auto traits = ggml_type_traits(type_id);
    if (!traits) p.error("unknown ggml type id ", type_id);
    t.type = traits->type;
    t.offset = p.le(8, "data offset");
    try {
      t.nbytes = gguf_tensor_nbytes(t.ne, t.type);
    } catch (const Error& e) {
      p.error(e.what());
    }
    if (!tensor_index_.emplace(t.name, tensors_.size()).second) p.error("appears twice in the tensor infos");
    tensors_.push_back(std::move(t));
  }

  // With no tensors a file may end right after the infos, unpadded.
  data_start_ = std::min<uint64_t>(align_up(p.pos(), alignment_), bytes.size());
  const uint64_t data_size = bytes.size() - data_start_;
  for (const GgufTensorInfo& t : tensors_) {
    p.set_context(str("tensor ", t.name));
    if (t.offset % alignment_ != 0)
      p.error("offset ", t.offset, " is not a multiple of the alignment ", alignment_);
    if (t.offset > data_size || t.nbytes > data_size - t.offset)
      p.error(ggml_type_name(t.type), " ", gguf_ne_str(t.ne), " needs ", t.nbytes, " bytes at offset ",
              t.offset, ", past the end of the data section (", data_size, " bytes from file offset ",
              data_start_, ")");
  }

  // Holes are allowed (padding), overlaps are not: in offset order, each
  // tensor must start at or after the furthest end so far. Empty tensors
  // occupy no bytes and overlap nothing.
  std::vector<size_t> order(tensors_.size());
  std::iota(order.begin(), order.end(), size_t(0));
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
  const GgufTensorInfo* furthest = nullptr;
  for (size_t i : order) {
    const GgufTensorInfo& t = tensors_[i];
    if (t.nbytes == 0) continue;
    if (furthest && t.offset < furthest->offset + furthest->nbytes) {
      p.set_context(str("tensor ", t.name));
      p.error("bytes [", t.offset, ", ", t.offset + t.nbytes, ") overlap tensor ", furthest->name, " [",
              furthest->offset, ", ", furthest->offset + furthest->nbytes, ")");
    }
    furthest = &t;
  }
}

const GgufValue* GgufFile::find(std::string_view key) const {
  const auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

std::span<const uint8_t> GgufFile::data(const GgufTensorInfo& t) const {
  // Guards against a GgufTensorInfo that came from another file.
  const uint64_t data_size = map_.size() - data_start_;
  if (t.offset > data_size || t.nbytes > data_size - t.offset)
    fail(path().string(), ": tensor ", t.name, ": bytes [", t.offset, ", ", t.offset + t.nbytes,
         ") are outside the data section (", data_size, " bytes)");
  return map_.bytes().subspan(size_t(data_start_ + t.offset), size_t(t.nbytes));
}

// ------------------------------------------------------- typed getters ----

namespace {

template <typename... Args>
[[noreturn]] void key_error(const fs::path& file, std::string_view key, Args&&... args) {
  fail(file.string(), ": key ", key, ": ", std::forward<Args>(args)...);
}

// An integer value as int64, or nullopt if it is not an integer or does not fit.
std::optional<int64_t> as_int(const GgufValue& v) {
  if (!gguf_is_integer(v.type)) return std::nullopt;
  if (const auto* i = std::get_if<int64_t>(&v.v)) return *i;
  if (const auto* u = std::get_if<uint64_t>(&v.v); u && *u <= uint64_t(std::numeric_limits<int64_t>::max()))
    return int64_t(*u);
  return std::nullopt;
}

std::optional<double> as_float(const GgufValue& v) {
  if (gguf_is_float(v.type)) return std::get<double>(v.v);
  if (const auto* i = std::get_if<int64_t>(&v.v); i && gguf_is_integer(v.type)) return double(*i);
  if (const auto* u = std::get_if<uint64_t>(&v.v); u && gguf_is_integer(v.type)) return double(*u);
  return std::nullopt;
}

}  // namespace

const GgufValue& GgufFile::at(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) key_error(path(), key, "absent from the metadata");
  return *v;
}

int64_t GgufFile::get_int(std::string_view key) const {
  const GgufValue& v = at(key);
  const auto i = as_int(v);
  if (!i) {
    if (gguf_is_integer(v.type))
      key_error(path(), key, "value ", std::get<uint64_t>(v.v), " does not fit in int64");
    key_error(path(), key, "expected an integer, got ", describe(v));
  }
  return *i;
}

double GgufFile::get_float(std::string_view key) const {
  const GgufValue& v = at(key);
  const auto f = as_float(v);
  if (!f) key_error(path(), key, "expected a number, got ", describe(v));
  return *f;
}

bool GgufFile::get_bool(std::string_view key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufType::BOOL) key_error(path(), key, "expected a bool, got ", describe(v));
  return std::get<bool>(v.v);
}

const std::string& GgufFile::get_string(std::string_view key) const {
  const GgufValue& v = at(key);
  if (v.type != GgufType::STRING) key_error(path(), key, "expected a string, got ", describe(v));
  return std::get<std::string>(v.v);
}

std::vector<std::string> GgufFile::get_string_array(std::string_view key) const {
  const GgufValue& v = at(key);
  const auto* a = std::get_if<GgufArray>(&v.v);
  if (!a || a->elem != GgufType::STRING)
    key_error(path(), key, "expected an array of strings, got ", describe(v));
  std::vector<std::string> r;
  r.reserve(a->items.size());
  for (const GgufValue& item : a->items) r.push_back(std::get<std::string>(item.v));
  return r;
}

std::vector<int64_t> GgufFile::get_int_array(std::string_view key) const {
  const GgufValue& v = at(key);
  const auto* a = std::get_if<GgufArray>(&v.v);
  if (!a || !gguf_is_integer(a->elem))
    key_error(path(), key, "expected an array of integers, got ", describe(v));
  std::vector<int64_t> r;
  r.reserve(a->items.size());
  for (const GgufValue& item : a->items) {
    const auto i = as_int(item);
    if (!i)
      key_error(path(), key, "element ", r.size(), " = ", std::get<uint64_t>(item.v),
                " does not fit in int64");
    r.push_back(*i);
  }
  return r;
}

std::vector<double> GgufFile::get_float_array(std::string_view key) const {
  const GgufValue& v = at(key);
  const auto* a = std::get_if<GgufArray>(&v.v);
  if (!a || !(gguf_is_float(a->elem) || gguf_is_integer(a->elem)))
    key_error(path(), key, "expected an array of numbers, got ", describe(v));
  std::vector<double> r;
  r.reserve(a->items.size());
  for (const GgufValue& item : a->items) r.push_back(*as_float(item));
  return r;
}

bool is_gguf_file(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return false;
  std::ifstream f(path, std::ios::binary);
  char m[4] = {};
  return f.read(m, 4) && std::equal(m, m + 4, kMagic);
}

}  // namespace qlora
