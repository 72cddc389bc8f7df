// GGUF reader and writer: round trips through the writer, hand-laid-out files
// for everything a writer would never produce, and the real SmolLM2 fixture.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/mapped_file.h"
#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "testing.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

// ------------------------------------------------------------ builders ----

// Little-endian pieces of a file laid out by hand, so that the reader can be
// fed what no writer makes.
std::string le(uint64_t v, unsigned n) {
  std::string s;
  for (unsigned i = 0; i < n; ++i) s.push_back(char(uint8_t(v >> (8 * i))));
  return s;
}
std::string u32(uint64_t v) {
  return le(v, 4);
}
std::string u64(uint64_t v) {
  return le(v, 8);
}
std::string gstr(const std::string& s) {
  return u64(s.size()) + s;
}

std::string kv(const std::string& key, GgufType t, const std::string& payload) {
  return gstr(key) + u32(uint32_t(t)) + payload;
}
std::string kv_string(const std::string& key, const std::string& value) {
  return kv(key, GgufType::STRING, gstr(value));
}

std::string tinfo(const std::string& name, const std::vector<int64_t>& ne, uint32_t type, uint64_t offset) {
  std::string s = gstr(name) + u32(ne.size());
  for (int64_t d : ne) s += u64(uint64_t(d));
  return s + u32(type) + u64(offset);
}

struct RawFile {
  uint32_t version = 3;
  std::vector<std::string> kvs = {kv_string("general.architecture", "llama")};
  std::vector<std::string> infos;
  std::string data;
  uint64_t alignment = 32;
  bool pad = true;  // pad the tensor infos to the alignment

  std::string bytes() const {
    std::string s = "GGUF" + u32(version) + u64(infos.size()) + u64(kvs.size());
    for (const auto& k : kvs) s += k;
    for (const auto& t : infos) s += t;
    if (pad) s.append((alignment - s.size() % alignment) % alignment, '\0');
    return s + data;
  }
};

// Two tensors: a F32 {8} at 0 (32 bytes) and b Q8_0 {32} at 32 (34 bytes).
RawFile two_tensors() {
  RawFile f;
  f.infos = {tinfo("a", {8}, uint32_t(GgmlType::F32), 0), tinfo("b", {32}, uint32_t(GgmlType::Q8_0), 32)};
  f.data = std::string(66, '\x5a');
  return f;
}

std::vector<uint8_t> pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = uint8_t((i * 131 + seed * 17 + (i >> 8)) & 0xff);
  return v;
}

std::vector<uint8_t> to_vec(std::span<const uint8_t> s) {
  return {s.begin(), s.end()};
}

void expect_mentions(const std::string& msg, std::initializer_list<std::string> parts) {
  for (const auto& part : parts)
    EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
}

std::string open_error(const fs::path& p) {
  try {
    GgufFile f(p);
  } catch (const Error& e) {
    return e.what();
  }
  return "<opened without error>";
}

// Writes `contents`, expects opening to fail with a message naming the file and `parts`.
void expect_open_fails(const ScratchDir& dir, const std::string& name, const std::string& contents,
                       std::initializer_list<std::string> parts) {
  SCOPED_TRACE(name);
  const fs::path p = dir / (name + ".gguf");
  write_bytes(p, contents);
  const std::string msg = open_error(p);
  expect_mentions(msg, {p.string()});
  expect_mentions(msg, parts);
}

// Values equal in type and payload; floats compared bit for bit (NaN, -0).
bool same_value(const GgufValue& a, const GgufValue& b) {
  if (a.type != b.type || a.v.index() != b.v.index()) return false;
  if (const auto* da = std::get_if<double>(&a.v)) {
    const double db = std::get<double>(b.v);
    if (a.type == GgufType::F32)
      return std::bit_cast<uint32_t>(float(*da)) == std::bit_cast<uint32_t>(float(db));
    return std::bit_cast<uint64_t>(*da) == std::bit_cast<uint64_t>(db);
  }
  if (const auto* aa = std::get_if<GgufArray>(&a.v)) {
    const auto& ab = std::get<GgufArray>(b.v);
    if (aa->elem != ab.elem || aa->items.size() != ab.items.size()) return false;
    for (size_t i = 0; i < aa->items.size(); ++i)
      if (!same_value(aa->items[i], ab.items[i])) return false;
    return true;
  }
  if (const auto* s = std::get_if<std::string>(&a.v)) return *s == std::get<std::string>(b.v);
  if (const auto* u = std::get_if<uint64_t>(&a.v)) return *u == std::get<uint64_t>(b.v);
  if (const auto* i = std::get_if<int64_t>(&a.v)) return *i == std::get<int64_t>(b.v);
  return std::get<bool>(a.v) == std::get<bool>(b.v);
}

GgufValue scalar_u(GgufType t, uint64_t v) {
  return {t, v};
}
GgufValue scalar_i(GgufType t, int64_t v) {
  return {t, v};
}
GgufValue array_of(GgufType elem, std::vector<GgufValue> items) {
  return {GgufType::ARRAY, GgufArray{elem, items}};
}

// `depth` arrays, each holding the next; the innermost holds one u8.
GgufValue nested(int depth) {
  GgufValue v = array_of(GgufType::U8, {scalar_u(GgufType::U8, 7)});
  for (int d = 1; d < depth; ++d) v = array_of(GgufType::ARRAY, {v});
  return v;
}

// Every value type, its extremes, empty strings and arrays, arrays of arrays.
std::vector<std::pair<std::string, GgufValue>> every_value() {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  std::vector<std::pair<std::string, GgufValue>> kvs = {
      {"u8", scalar_u(GgufType::U8, 255)},
      {"i8", scalar_i(GgufType::I8, -128)},
      {"u16", scalar_u(GgufType::U16, 65535)},
      {"i16", scalar_i(GgufType::I16, -32768)},
      {"u32", scalar_u(GgufType::U32, 4294967295u)},
      {"i32", scalar_i(GgufType::I32, std::numeric_limits<int32_t>::min())},
      {"u64", scalar_u(GgufType::U64, std::numeric_limits<uint64_t>::max())},
      {"i64", scalar_i(GgufType::I64, std::numeric_limits<int64_t>::min())},
      {"f32", {GgufType::F32, double(1e-6f)}},
      {"f32.nan", {GgufType::F32, nan}},
      {"f32.neg_zero", {GgufType::F32, -0.0}},
      {"f64", {GgufType::F64, 3.141592653589793}},
      {"f64.inf", {GgufType::F64, -inf}},
      {"bool.true", {GgufType::BOOL, true}},
      {"bool.false", {GgufType::BOOL, false}},
      {"string", {GgufType::STRING, std::string("h\xc3\xa9llo \n world")}},
      {"string.empty", {GgufType::STRING, std::string()}},
      {"string.nul", {GgufType::STRING, std::string("a\0b", 3)}},
      {"array.empty", array_of(GgufType::I32, {})},
      {"array.empty_strings", array_of(GgufType::STRING, {})},
      {"array.strings",
       array_of(GgufType::STRING, {{GgufType::STRING, std::string("x")}, {GgufType::STRING, std::string()}})},
      {"array.bools", array_of(GgufType::BOOL, {{GgufType::BOOL, true}, {GgufType::BOOL, false}})},
      {"array.f64s", array_of(GgufType::F64, {{GgufType::F64, 0.5}, {GgufType::F64, -2.0}})},
      // Arrays of arrays: each inner array carries its own element type.
      {"array.nested", array_of(GgufType::ARRAY, {array_of(GgufType::U16, {scalar_u(GgufType::U16, 1)}),
                                                  array_of(GgufType::STRING, {}),
                                                  array_of(GgufType::ARRAY, {array_of(GgufType::F32, {})})})},
      {"array.deepest", nested(kGgufMaxArrayDepth)},
  };
  // One array of every scalar type.
  for (const auto& [key, v] : std::vector(kvs.begin(), kvs.begin() + 14)) {
    if (key.find('.') != std::string::npos) continue;
    kvs.push_back({"array." + key, array_of(v.type, {v, v})});
  }
  return kvs;
}

// ---------------------------------------------------------- round trip ----

TEST(GgufRoundTrip, EveryValueType) {
  ScratchDir dir;
  const fs::path p = dir / "values.gguf";
  const auto kvs = every_value();
  {
    GgufWriter w(p);
    for (const auto& [key, v] : kvs) w.add(key, v);
    w.commit();
  }
  GgufFile f(p);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_TRUE(f.tensors().empty());
  ASSERT_EQ(f.metadata().size(), kvs.size());
  for (size_t i = 0; i < kvs.size(); ++i) {
    EXPECT_EQ(f.metadata()[i].first, kvs[i].first);  // file order kept
    EXPECT_TRUE(same_value(f.metadata()[i].second, kvs[i].second)) << kvs[i].first;
    ASSERT_NE(f.find(kvs[i].first), nullptr);
  }
  EXPECT_EQ(f.find("absent"), nullptr);
}

TEST(GgufRoundTrip, TypedAddersAndGetters) {
  ScratchDir dir;
  const fs::path p = dir / "typed.gguf";
  const std::vector<std::string> tokens = {"<s>", "", "hello"};
  const std::vector<int64_t> ints = {-1, 0, 7};
  const std::vector<float> scores = {0.5f, -1.25f};
  {
    GgufWriter w(p);
    w.add_string("general.architecture", "llama");
    w.add_u32("llama.block_count", 30);
    w.add_u64("big", std::numeric_limits<uint64_t>::max());
    w.add_i8("i8", -3);
    w.add_u8("u8", 200);
    w.add_i16("i16", -300);
    w.add_u16("u16", 60000);
    w.add_i32("i32", -70000);
    w.add_i64("i64", -(int64_t(1) << 40));
    w.add_f32("llama.rope.freq_base", 100000.0f);
    w.add_f64("f64", 0.1);
    w.add_bool("flag", true);
    w.add_string_array("tokenizer.ggml.tokens", tokens);
    w.add_int_array("tokenizer.ggml.token_type", ints);
    w.add_int_array("unsigned", std::vector<int64_t>{1, 2}, GgufType::U8);
    w.add_float_array("tokenizer.ggml.scores", scores);
    w.add_float_array("doubles", std::vector<double>{0.25}, GgufType::F64);
    w.commit();
  }
  GgufFile f(p);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.block_count"), 30);
  EXPECT_EQ(f.find("llama.block_count")->type, GgufType::U32);
  EXPECT_EQ(f.get_int("i8"), -3);
  EXPECT_EQ(f.get_int("u8"), 200);
  EXPECT_EQ(f.get_int("i16"), -300);
  EXPECT_EQ(f.get_int("u16"), 60000);
  EXPECT_EQ(f.get_int("i32"), -70000);
  EXPECT_EQ(f.get_int("i64"), -(int64_t(1) << 40));
  EXPECT_EQ(f.get_float("llama.rope.freq_base"), 100000.0);
  EXPECT_EQ(f.get_float("llama.block_count"), 30.0);  // integers are numbers
  EXPECT_EQ(f.get_float("f64"), 0.1);
  EXPECT_TRUE(f.get_bool("flag"));
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.tokens"), tokens);
  EXPECT_EQ(f.get_int_array("tokenizer.ggml.token_type"), ints);
  EXPECT_EQ(f.find("tokenizer.ggml.token_type")->type, GgufType::ARRAY);
  EXPECT_EQ(std::get<GgufArray>(f.find("tokenizer.ggml.token_type")->v).elem, GgufType::I32);
  EXPECT_EQ(std::get<GgufArray>(f.find("unsigned")->v).elem, GgufType::U8);
  EXPECT_EQ(f.get_int_array("unsigned"), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(f.get_float_array("tokenizer.ggml.scores"), (std::vector<double>{0.5, -1.25}));
  EXPECT_EQ(f.get_float_array("tokenizer.ggml.token_type"), (std::vector<double>{-1, 0, 7}));
  EXPECT_EQ(f.get_float_array("doubles"), std::vector<double>{0.25});

  // Wrong types and absent keys name the file and the key.
  const std::string file = p.string();
  expect_mentions(error_of([&] { f.get_int("general.architecture"); }),
                  {file, "key general.architecture", "expected an integer, got string"});
  expect_mentions(error_of([&] { f.get_int("big"); }), {file, "key big", "does not fit"});
  expect_mentions(error_of([&] { f.get_string("llama.block_count"); }),
                  {file, "key llama.block_count", "expected a string, got u32"});
  expect_mentions(error_of([&] { f.get_bool("u8"); }), {file, "key u8", "expected a bool"});
  expect_mentions(error_of([&] { f.get_float("flag"); }), {file, "key flag", "got bool"});
  expect_mentions(error_of([&] { f.get_string_array("tokenizer.ggml.token_type"); }),
                  {file, "key tokenizer.ggml.token_type", "expected an array of strings, got array of i32"});
  expect_mentions(error_of([&] { f.get_int_array("tokenizer.ggml.scores"); }),
                  {file, "tokenizer.ggml.scores", "array of f32"});
  expect_mentions(error_of([&] { f.get_float_array("tokenizer.ggml.tokens"); }),
                  {file, "tokenizer.ggml.tokens"});
  expect_mentions(error_of([&] { f.get_int("llama.nope"); }), {file, "key llama.nope", "absent"});
}

TEST(GgufRoundTrip, TensorsStreamedInPieces) {
  ScratchDir dir;
  const fs::path p = dir / "tensors.gguf";
  struct Decl {
    std::string name;
    std::vector<int64_t> ne;
    GgmlType type;
  };
  const std::vector<Decl> decls = {
      {"token_embd.weight", {64, 3}, GgmlType::Q8_0},    {"empty", {0, 4}, GgmlType::F32},
      {"blk.0.attn_q.weight", {256, 2}, GgmlType::Q4_K}, {"norm", {5}, GgmlType::F16},
      {"four_d", {32, 1, 2, 1}, GgmlType::Q4_1},         {"last", {3}, GgmlType::I8}};
  std::vector<std::vector<uint8_t>> data;
  std::vector<uint8_t> all;
  {
    GgufWriter w(p);
    w.add_string("general.architecture", "llama");
    for (const Decl& d : decls) {
      const uint64_t off = w.add_tensor(d.name, d.ne, d.type);
      EXPECT_EQ(off % 32, 0u) << d.name;
      data.push_back(pattern(w.tensors().back().nbytes, uint32_t(data.size())));
      all.insert(all.end(), data.back().begin(), data.back().end());
    }
    // Pieces of 7 bytes straddle every tensor boundary.
    for (size_t i = 0; i < all.size(); i += 7) w.write(all.data() + i, std::min<size_t>(7, all.size() - i));
    EXPECT_FALSE(fs::exists(p));
    w.commit();
  }
  EXPECT_TRUE(is_gguf_file(p));
  GgufFile f(p);
  ASSERT_EQ(f.tensors().size(), decls.size());
  EXPECT_EQ(f.data_start() % 32, 0u);
  EXPECT_EQ(f.file_size() % 32, 0u);  // the last tensor is padded too
  for (size_t i = 0; i < decls.size(); ++i) {
    const GgufTensorInfo& t = f.tensors()[i];
    EXPECT_EQ(t.name, decls[i].name);
    EXPECT_EQ(t.ne, decls[i].ne);
    EXPECT_EQ(t.type, decls[i].type);
    EXPECT_EQ(t.nbytes, data[i].size());
    EXPECT_EQ(to_vec(f.data(t)), data[i]) << t.name;
    EXPECT_EQ(f.find_tensor(t.name), &t);
  }
  const GgufTensorInfo& embd = *f.find_tensor("token_embd.weight");
  EXPECT_EQ(embd.nbytes, 2u * 34 * 3);
  EXPECT_EQ(embd.numel(), 64 * 3);
  EXPECT_EQ(embd.shape(), (std::vector<int64_t>{3, 64}));
  EXPECT_EQ(f.find_tensor("blk.0.attn_q.weight")->nbytes, 2u * 144);
  EXPECT_EQ(f.find_tensor("empty")->nbytes, 0u);
  EXPECT_TRUE(f.data(*f.find_tensor("empty")).empty());
  EXPECT_EQ(f.find_tensor("absent"), nullptr);

  // Without the padding after the last tensor every tensor is still whole,
  // and the file still reads.
  const GgufTensorInfo& last = f.tensors().back();
  const fs::path cut = dir / "unpadded.gguf";
  write_bytes(cut, read_bytes(p).substr(0, f.data_start() + last.offset + last.nbytes));
  EXPECT_EQ(to_vec(GgufFile(cut).data(last)), data.back());
}

TEST(GgufRoundTrip, AlignmentOtherThan32) {
  for (uint32_t alignment : {1u, 8u, 64u, 4096u}) {
    SCOPED_TRACE(alignment);
    ScratchDir dir;
    const fs::path p = dir / "aligned.gguf";
    const auto a = pattern(6, 1), b = pattern(34, 2);
    {
      GgufWriter w(p);
      w.add_u32("general.alignment", alignment);
      EXPECT_EQ(w.alignment(), alignment);
      EXPECT_EQ(w.add_tensor("a", {3}, GgmlType::F16), 0u);
      EXPECT_EQ(w.add_tensor("b", {32}, GgmlType::Q8_0), (6 + alignment - 1) / alignment * alignment);
      w.write(a.data(), a.size());
      w.write(b.data(), b.size());
      w.commit();
    }
    GgufFile f(p);
    EXPECT_EQ(f.alignment(), alignment);
    EXPECT_EQ(f.data_start() % alignment, 0u);
    EXPECT_EQ(f.file_size() % alignment, 0u);
    EXPECT_EQ(to_vec(f.data(*f.find_tensor("a"))), a);
    EXPECT_EQ(to_vec(f.data(*f.find_tensor("b"))), b);
  }
}

TEST(GgufRoundTrip, ReadsVersion2AndHoles) {
  ScratchDir dir;
  // v2 has the v3 layout. Holes between tensors are allowed (only overlaps
  // are refused), and so are trailing bytes and tensors out of offset order.
  RawFile raw;
  raw.version = 2;
  raw.infos = {tinfo("late", {4}, uint32_t(GgmlType::I8), 64),
               tinfo("early", {2}, uint32_t(GgmlType::F32), 0)};
  raw.data = std::string(100, '\x01');
  const fs::path p = dir / "v2.gguf";
  write_bytes(p, raw.bytes());
  GgufFile f(p);
  EXPECT_EQ(f.version(), 2u);
  EXPECT_EQ(f.tensors()[0].name, "late");
  EXPECT_EQ(f.data(*f.find_tensor("late")).size(), 4u);
}

// ----------------------------------------------------------- bad input ----

TEST(GgufReader, EveryTruncationThrows) {
  ScratchDir dir;
  const fs::path whole = dir / "whole.gguf";
  {
    GgufWriter w(whole);
    w.add_string("general.architecture", "llama");
    w.add_u32("llama.block_count", 2);
    w.add("nested",
          array_of(GgufType::ARRAY, {array_of(GgufType::STRING, {{GgufType::STRING, std::string("ab")}}),
                                     array_of(GgufType::F64, {{GgufType::F64, 1.0}})}));
    w.add_bool("flag", false);
    w.add_tensor("a", {32}, GgmlType::Q4_0);
    w.add_tensor("b", {8}, GgmlType::F32);  // 32 bytes: the file ends at its last data byte
    const auto d = pattern(18 + 32, 3);
    w.write(d.data(), d.size());
    w.commit();
  }
  const std::string bytes = read_bytes(whole);
  ASSERT_NO_THROW(GgufFile{whole});
  const fs::path p = dir / "cut.gguf";
  for (size_t n = 0; n < bytes.size(); ++n) {
    SCOPED_TRACE(n);
    write_bytes(p, bytes.substr(0, n));
    expect_mentions(open_error(p), {p.string()});
  }
}

TEST(GgufReader, HeaderErrors) {
  ScratchDir dir;
  std::string bad_magic = two_tensors().bytes();
  bad_magic[3] = 'X';
  expect_open_fails(dir, "magic", bad_magic, {"not a GGUF file", "GGUX"});
  expect_open_fails(dir, "short", "GG", {"too short"});
  RawFile v1 = two_tensors();
  v1.version = 1;
  expect_open_fails(dir, "v1", v1.bytes(), {"version 1 is not supported"});
  RawFile v4 = two_tensors();
  v4.version = 4;
  expect_open_fails(dir, "v4", v4.bytes(), {"unsupported GGUF version 4", "expected 2 or 3"});
  RawFile big_endian = two_tensors();
  big_endian.version = 0x03000000;
  expect_open_fails(dir, "big_endian", big_endian.bytes(), {"big-endian"});
}

TEST(GgufReader, CountsLargerThanTheFile) {
  ScratchDir dir;
  const std::string start = "GGUF" + u32(3);
  expect_open_fails(dir, "kv_count", start + u64(0) + u64(uint64_t(1) << 60) + std::string(64, '\0'),
                    {"key/value count 1152921504606846976", "cannot fit"});
  expect_open_fails(dir, "tensor_count", start + u64(uint64_t(1) << 60) + u64(0) + std::string(64, '\0'),
                    {"tensor count 1152921504606846976", "cannot fit"});

  RawFile s = two_tensors();
  s.kvs.push_back(gstr("general.name") + u32(uint32_t(GgufType::STRING)) + u64(uint64_t(1) << 40) + "abc");
  expect_open_fails(dir, "string_length", s.bytes(), {"key general.name", "string of 1099511627776 bytes"});

  RawFile k = two_tensors();
  k.kvs.push_back(u64(uint64_t(1) << 40) + "abc");
  expect_open_fails(dir, "key_length", k.bytes(), {"key #1", "1099511627776"});

  RawFile a = two_tensors();
  a.kvs.push_back(
      kv("tokenizer.ggml.tokens", GgufType::ARRAY, u32(uint32_t(GgufType::STRING)) + u64(~uint64_t(0))));
  expect_open_fails(dir, "array_count", a.bytes(),
                    {"key tokenizer.ggml.tokens", "array of 18446744073709551615 string values"});

  RawFile n = two_tensors();
  n.infos[1] = gstr("b") + u32(1) + u64(32);  // cut off after ne
  n.data.clear();
  n.pad = false;
  expect_open_fails(dir, "tensor_info", n.bytes(), {"tensor b", "ggml type"});
}

TEST(GgufReader, TensorLayoutErrors) {
  ScratchDir dir;
  RawFile misaligned = two_tensors();
  misaligned.infos[1] = tinfo("b", {32}, uint32_t(GgmlType::Q8_0), 40);
  misaligned.data.append(32, '\0');
  expect_open_fails(dir, "misaligned", misaligned.bytes(),
                    {"tensor b: offset 40 is not a multiple of the alignment 32"});

  RawFile overlap = two_tensors();
  overlap.infos[1] = tinfo("b", {32}, uint32_t(GgmlType::Q8_0), 0);
  expect_open_fails(dir, "overlap", overlap.bytes(), {"tensor", "overlap tensor"});

  RawFile past_end = two_tensors();
  past_end.data.resize(65);
  expect_open_fails(dir, "past_end", past_end.bytes(), {"tensor b", "past the end of the data section"});

  RawFile far = two_tensors();
  far.infos[1] = tinfo("b", {32}, uint32_t(GgmlType::Q8_0), uint64_t(1) << 62);
  expect_open_fails(dir, "far_offset", far.bytes(), {"tensor b", "past the end"});

  RawFile partial_block = two_tensors();
  partial_block.infos[1] = tinfo("b", {33}, uint32_t(GgmlType::Q8_0), 32);
  expect_open_fails(dir, "partial_block", partial_block.bytes(),
                    {"tensor b", "ne[0] = 33 is not a multiple of the 32-value blocks of Q8_0"});

  // Q8_0 {16, 2}: 32 values, a whole block in total, but ne[0] splits it.
  RawFile split_row = two_tensors();
  split_row.infos[1] = tinfo("b", {16, 2}, uint32_t(GgmlType::Q8_0), 32);
  expect_open_fails(dir, "split_row", split_row.bytes(), {"tensor b", "ne[0] = 16"});

  RawFile dims0 = two_tensors();
  dims0.infos[0] = gstr("a") + u32(0) + u32(0) + u64(0);
  expect_open_fails(dir, "n_dims0", dims0.bytes(), {"tensor a", "n_dims is 0, expected 1 to 4"});
  RawFile dims5 = two_tensors();
  dims5.infos[0] = tinfo("a", {8, 1, 1, 1, 1}, uint32_t(GgmlType::F32), 0);
  expect_open_fails(dir, "n_dims5", dims5.bytes(), {"tensor a", "n_dims is 5"});

  RawFile negative = two_tensors();
  negative.infos[0] = tinfo("a", {-8}, uint32_t(GgmlType::F32), 0);
  expect_open_fails(dir, "negative", negative.bytes(), {"tensor a", "negative dimension"});

  RawFile overflow = two_tensors();
  overflow.infos[0] = tinfo("a", {int64_t(1) << 40, int64_t(1) << 40}, uint32_t(GgmlType::F32), 0);
  expect_open_fails(dir, "overflow", overflow.bytes(), {"tensor a", "overflows"});

  RawFile bytes_overflow = two_tensors();  // 2^62 values fit int64, 2^64 bytes do not
  bytes_overflow.infos[0] = tinfo("a", {int64_t(1) << 31, int64_t(1) << 31}, uint32_t(GgmlType::F32), 0);
  expect_open_fails(dir, "bytes_overflow", bytes_overflow.bytes(), {"tensor a", "overflows"});

  RawFile unknown = two_tensors();
  unknown.infos[0] = tinfo("a", {8}, 4, 0);  // Q4_2, removed from ggml
  expect_open_fails(dir, "unknown_ggml", unknown.bytes(), {"tensor a", "unknown ggml type id 4"});

  RawFile duplicate = two_tensors();
  duplicate.infos[1] = tinfo("a", {8}, uint32_t(GgmlType::F32), 32);
  expect_open_fails(dir, "duplicate_tensor", duplicate.bytes(), {"tensor a", "appears twice"});

  RawFile long_name = two_tensors();
  long_name.infos[0] = tinfo(std::string(64, 'n'), {8}, uint32_t(GgmlType::F32), 0);
  expect_open_fails(dir, "long_name", long_name.bytes(), {"tensor nnnn", "longer than ggml's limit of 63"});
}

TEST(GgufReader, MetadataErrors) {
  ScratchDir dir;
  RawFile unknown = two_tensors();
  unknown.kvs.push_back(kv("x.y", GgufType(13), u32(0)));
  expect_open_fails(dir, "unknown_value_type", unknown.bytes(), {"key x.y", "unknown value type 13"});

  RawFile unknown_elem = two_tensors();
  unknown_elem.kvs.push_back(kv("x.y", GgufType::ARRAY, u32(99) + u64(0)));
  expect_open_fails(dir, "unknown_elem_type", unknown_elem.bytes(),
                    {"key x.y", "unknown array element type 99"});

  RawFile duplicate = two_tensors();
  duplicate.kvs.push_back(kv_string("general.architecture", "qwen2"));
  expect_open_fails(dir, "duplicate_key", duplicate.bytes(), {"key general.architecture", "appears twice"});

  RawFile bad_bool = two_tensors();
  bad_bool.kvs.push_back(kv("flag", GgufType::BOOL, std::string(1, '\x02')));
  expect_open_fails(dir, "bool", bad_bool.bytes(), {"key flag", "bool value 2"});

  for (uint32_t a : {0u, 24u, 33u}) {
    RawFile align = two_tensors();
    align.kvs.push_back(kv("general.alignment", GgufType::U32, u32(a)));
    expect_open_fails(dir, str("alignment", a), align.bytes(),
                      {"key general.alignment", str("alignment ", a, " is not a power of two")});
  }
  RawFile align64 = two_tensors();
  align64.kvs.push_back(kv("general.alignment", GgufType::U64, u64(32)));
  expect_open_fails(dir, "alignment_u64", align64.bytes(),
                    {"key general.alignment", "expected a u32, got u64"});

  // An array of one u8 inside `depth` - 1 arrays of arrays.
  auto nested_raw = [](int depth) {
    std::string payload;
    for (int d = 1; d < depth; ++d) payload += u32(uint32_t(GgufType::ARRAY)) + u64(1);
    payload += u32(uint32_t(GgufType::U8)) + u64(1) + "\x07";
    RawFile f = two_tensors();
    f.kvs.push_back(kv("deep", GgufType::ARRAY, payload));
    return f.bytes();
  };

  expect_open_fails(dir, "too_deep", nested_raw(kGgufMaxArrayDepth + 1),
                    {"key deep", "nested more than 8 deep"});
  const fs::path ok = dir / "deep_ok.gguf";
  write_bytes(ok, nested_raw(kGgufMaxArrayDepth));
  EXPECT_TRUE(same_value(*GgufFile(ok).find("deep"), nested(kGgufMaxArrayDepth)));
  // Far deeper than any stack could recurse: refused at depth 9, not a crash.
  expect_open_fails(dir, "very_deep", nested_raw(100000), {"key deep", "nested more than"});
}

TEST(GgufReader, IsGgufFile) {
  ScratchDir dir;
  write_bytes(dir / "yes.gguf", two_tensors().bytes());
  write_bytes(dir / "no.gguf", "GGML....");
  write_bytes(dir / "short", "GG");
  EXPECT_TRUE(is_gguf_file(dir / "yes.gguf"));
  EXPECT_FALSE(is_gguf_file(dir / "no.gguf"));
  EXPECT_FALSE(is_gguf_file(dir / "short"));
  EXPECT_FALSE(is_gguf_file(dir.path()));
  EXPECT_FALSE(is_gguf_file(dir / "absent"));
}

// -------------------------------------------------------------- writer ----

TEST(GgufWriter, ShortOrLongDataLeavesNothing) {
  ScratchDir dir;
  const fs::path p = dir / "short.gguf";
  {
    GgufWriter w(p);
    w.add_tensor("a", {8}, GgmlType::F32);
    w.add_tensor("b", {4}, GgmlType::F32);
    w.write(pattern(40, 1));
    expect_mentions(error_of([&] { w.commit(); }), {p.string(), "only 40 of 48", "tensor b is incomplete"});
    EXPECT_THROW(w.commit(), Error);  // unusable after an error
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));  // no temporary file either
  {
    GgufWriter w(p);
    w.add_tensor("a", {8}, GgmlType::F32);
    expect_mentions(error_of([&] { w.write(pattern(33, 1)); }), {p.string(), "1 bytes more"});
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));  // no temporary file either
  {
    GgufWriter w(p);
    w.add_string("k", "v");  // never committed
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));  // no temporary file either
}

TEST(GgufWriter, RefusesWhatReadersRefuse) {
  ScratchDir dir;
  const fs::path p = dir / "bad.gguf";
  GgufWriter w(p);
  const std::string f = p.string();
  w.add_u32("a", 1);
  expect_mentions(error_of([&] { w.add_string("a", "again"); }), {f, "key a is added twice"});
  expect_mentions(error_of([&] { w.add_u64("general.alignment", 32); }),
                  {f, "general.alignment", "expected a u32"});
  expect_mentions(error_of([&] { w.add_u32("general.alignment", 0); }), {f, "not a power of two"});
  expect_mentions(error_of([&] { w.add_u32("general.alignment", 48); }),
                  {f, "alignment 48 is not a power of two"});
  expect_mentions(error_of([&] { w.add("x", scalar_u(GgufType::U8, 256)); }),
                  {f, "key x", "u8 value 256 is out of range"});
  expect_mentions(error_of([&] { w.add("x", scalar_i(GgufType::I16, 40000)); }),
                  {f, "key x", "out of range"});
  expect_mentions(error_of([&] { w.add("x", scalar_i(GgufType::U32, 1)); }),
                  {f, "key x", "held as uint64_t"});
  expect_mentions(error_of([&] { w.add("x", {GgufType::F32, 1e300}); }), {f, "key x", "out of range"});
  expect_mentions(error_of([&] { w.add("x", {GgufType(13), uint64_t(0)}); }), {f, "unknown value type 13"});
  expect_mentions(error_of([&] { w.add("x", array_of(GgufType::U8, {scalar_u(GgufType::U16, 1)})); }),
                  {f, "key x", "element 0 of type u16"});
  expect_mentions(error_of([&] { w.add("x", nested(kGgufMaxArrayDepth + 1)); }),
                  {f, "key x", "nested more than 8"});
  expect_mentions(error_of([&] { w.add_int_array("x", std::vector<int64_t>{-1}, GgufType::U32); }),
                  {f, "key x", "out of range"});
  expect_mentions(error_of([&] { w.add_int_array("x", std::vector<int64_t>{1}, GgufType::F32); }),
                  {f, "key x"});

  w.add_tensor("t", {32}, GgmlType::Q4_0);
  expect_mentions(error_of([&] { w.add_tensor("t", {32}, GgmlType::Q4_0); }),
                  {f, "tensor t is declared twice"});
  expect_mentions(error_of([&] { w.add_tensor("u", {31}, GgmlType::Q4_0); }), {f, "tensor u", "ne[0] = 31"});
  expect_mentions(error_of([&] {
                    w.add_tensor("u", {1, 1, 1, 1, 1}, GgmlType::F32);
                  }),
                  {f, "tensor u", "5 dimensions"});
  expect_mentions(error_of([&] { w.add_tensor("u", {}, GgmlType::F32); }), {f, "tensor u", "0 dimensions"});
  expect_mentions(error_of([&] { w.add_tensor("u", {-1}, GgmlType::F32); }), {f, "tensor u", "negative"});
  expect_mentions(error_of([&] { w.add_tensor(std::string(64, 'x'), {1}, GgmlType::F32); }),
                  {f, "limit of 63"});
  expect_mentions(error_of([&] { w.add_tensor("u", {1}, GgmlType(4)); }),
                  {f, "tensor u", "unknown ggml type id 4"});
  expect_mentions(error_of([&] { w.add_u32("late", 1); }), {f, "key late", "before the first tensor"});
  w.write(pattern(18, 0));
  expect_mentions(error_of([&] { w.add_tensor("v", {1}, GgmlType::F32); }),
                  {f, "tensor v", "before the first write"});
  // The refused calls changed nothing: the file holds a and t.
  w.commit();
  GgufFile r(p);
  EXPECT_EQ(r.metadata().size(), 1u);
  EXPECT_EQ(r.tensors().size(), 1u);
}

// ------------------------------------------------------------- fixture ----

// The file that test_gguf's fixture tests read (a quantized SmolLM2).
fs::path smollm2_gguf(const fs::path& fixtures) {
  return fixtures / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";
}

#define REQUIRE_SMOLLM2_GGUF(var)                   \
  QLORA_REQUIRE_FIXTURES(fixtures_root);            \
  const fs::path var = smollm2_gguf(fixtures_root); \
  if (!fs::exists(var)) GTEST_SKIP() << "fixture not found: " << var.string()

TEST(GgufFixture, ReadsSmolLM2) {
  REQUIRE_SMOLLM2_GGUF(path);
  GgufFile f(path);
  EXPECT_TRUE(is_gguf_file(path));
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.metadata().size(), 33u);  // gguf-py lists 36 fields: these + version, tensor_count, kv_count
  EXPECT_EQ(f.tensors().size(), 272u);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.block_count"), 30);
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.tokens").size(), 49152u);
  EXPECT_EQ(f.get_int_array("tokenizer.ggml.token_type").size(), 49152u);
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.merges").size(), 48900u);

  const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->type, GgmlType::Q8_0);
  EXPECT_EQ(embd->ne, (std::vector<int64_t>{576, 49152}));
  EXPECT_EQ(embd->nbytes, 576u / 32 * 34 * 49152);
  size_t q4_1 = 0;
  for (const GgufTensorInfo& t : f.tensors()) q4_1 += t.type == GgmlType::Q4_1;
  EXPECT_EQ(q4_1, 210u);

  // The data section is packed: tensors in file order, each padded to 32,
  // the last one ending at the end of the file.
  uint64_t offset = 0;
  for (const GgufTensorInfo& t : f.tensors()) {
    EXPECT_EQ(t.offset, offset) << t.name;
    offset += (t.nbytes + 31) / 32 * 32;
  }
  EXPECT_EQ(f.data_start() + offset, f.file_size());
}

// Reading every key and tensor and writing them again reproduces the file
// byte for byte: the writer lays out what llama.cpp's writer does.
TEST(GgufFixture, RewriteIsByteIdentical) {
  REQUIRE_SMOLLM2_GGUF(path);
  ScratchDir dir;
  const fs::path out = dir / "rewrite.gguf";
  {
    GgufFile f(path);
    GgufWriter w(out);
    for (const auto& [key, value] : f.metadata()) w.add(key, value);
    for (const GgufTensorInfo& t : f.tensors())
      EXPECT_EQ(w.add_tensor(t.name, t.ne, t.type), t.offset) << t.name;
    for (const GgufTensorInfo& t : f.tensors()) w.write(f.data(t));
    w.commit();
  }
  const MappedFile a(path), b(out);
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.bytes().data(), b.bytes().data(), a.size()), 0);
}

}  // namespace
}  // namespace qlora
