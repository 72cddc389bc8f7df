#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "testing.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

constexpr DType kAllDTypes[] = {DType::F64, DType::F32, DType::F16, DType::BF16, DType::F8_E4M3,
                                DType::F8_E5M2, DType::I64, DType::I32, DType::I16, DType::I8,
                                DType::U64, DType::U32, DType::U16, DType::U8, DType::BOOL};

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char(uint8_t(v >> (8 * i)));
  return s;
}

// A file laid out by hand, so that the reader can be fed what no writer makes.
std::string raw_file(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

std::vector<uint8_t> pattern(size_t n, uint32_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = uint8_t((i * 131 + seed * 17 + (i >> 8)) & 0xff);
  return v;
}

std::vector<uint8_t> to_vec(std::span<const uint8_t> s) { return {s.begin(), s.end()}; }

// The message of the Error that opening `p` throws, or a marker if none is thrown.
std::string open_error(const fs::path& p) {
  try {
    SafetensorsFile f(p);
  } catch (const Error& e) {
    return e.what();
  }
  return "<opened without error>";
}

std::string model_error(const fs::path& p) {
  try {
    SafetensorsModel m(p);
  } catch (const Error& e) {
    return e.what();
  }
  return "<opened without error>";
}

// Expects the message to name every one of `parts`.
void expect_mentions(const std::string& msg, std::initializer_list<std::string> parts) {
  for (const auto& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
}

void expect_open_fails(const ScratchDir& dir, const std::string& name, const std::string& contents,
                       std::initializer_list<std::string> parts) {
  const fs::path p = dir / name;
  write_bytes(p, contents);
  const std::string msg = open_error(p);
  expect_mentions(msg, {p.string()});
  expect_mentions(msg, parts);
}

// ----------------------------------------------------------- helpers ----

TEST(Safetensors, ShapeHelpers) {
  EXPECT_EQ(shape_numel({}), 1);
  EXPECT_EQ(shape_numel({0, 3}), 0);
  EXPECT_EQ(shape_numel({4096, 11008}), 4096 * 11008);
  EXPECT_EQ(shape_str({4096, 11008}), "[4096, 11008]");
  EXPECT_EQ(shape_str({}), "[]");
  EXPECT_EQ(shape_str({7}), "[7]");
  EXPECT_THROW(shape_numel({-1, 2}), Error);
  EXPECT_THROW(shape_numel({int64_t(1) << 40, int64_t(1) << 40}), Error);
}

// ------------------------------------------------------- round trips ----

TEST(Safetensors, RoundTripEveryDtype) {
  ScratchDir dir;
  const std::vector<Shape> shapes = {{}, {0, 3}, {5}, {2, 3}, {3, 1, 2}};
  std::vector<OwnedTensor> tensors;
  for (DType t : kAllDTypes)
    for (size_t s = 0; s < shapes.size(); ++s) {
      const std::string name = str("t.", dtype_name(t), ".", s);
      tensors.push_back({name, t, shapes[s], pattern(size_t(shape_numel(shapes[s])) * dtype_size(t), uint32_t(tensors.size()))});
    }
  const fs::path p = dir / "all.safetensors";
  save_safetensors(p, tensors);

  SafetensorsFile f(p);
  ASSERT_EQ(f.tensors().size(), tensors.size());
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(f.file_size(), fs::file_size(p));
  for (const OwnedTensor& t : tensors) {
    const TensorInfo* info = f.find(t.name);
    ASSERT_NE(info, nullptr) << t.name;
    EXPECT_EQ(info->name, t.name);
    EXPECT_EQ(info->dtype, t.dtype) << t.name;
    EXPECT_EQ(info->shape, t.shape) << t.name;
    EXPECT_EQ(info->nbytes(), t.bytes.size()) << t.name;
    EXPECT_EQ(info->numel(), shape_numel(t.shape));
    EXPECT_EQ(to_vec(f.data(*info)), t.bytes) << t.name;
  }
  EXPECT_EQ(f.find("absent"), nullptr);

  // The data section starts 8-byte aligned, as the reference writer pads it.
  const std::string raw = read_bytes(p);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | uint8_t(raw[size_t(i)]);
  EXPECT_EQ((8 + n) % 8, 0u);
  const auto header = nlohmann::json::parse(raw.substr(8, n));
  EXPECT_FALSE(header.contains("__metadata__"));
  EXPECT_EQ(header["t.BF16.3"]["dtype"], "BF16");
  EXPECT_EQ(header["t.BF16.3"]["shape"], nlohmann::json({2, 3}));
}

TEST(Safetensors, TensorsAreInFileOrder) {
  ScratchDir dir;
  const fs::path p = dir / "order.safetensors";
  save_safetensors(p, {{"zeta", DType::U8, {2}, {1, 2}},
                       {"alpha", DType::U8, {3}, {3, 4, 5}},
                       {"mid", DType::U8, {1}, {6}}});
  SafetensorsFile f(p);
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.tensors()[0].name, "zeta");
  EXPECT_EQ(f.tensors()[1].name, "alpha");
  EXPECT_EQ(f.tensors()[2].name, "mid");
  EXPECT_EQ(f.tensors()[1].begin, 2u);
  EXPECT_EQ(f.tensors()[1].end, 5u);
}

TEST(Safetensors, MetadataRoundTrip) {
  ScratchDir dir;
  const fs::path p = dir / "meta.safetensors";
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "quoted \"text\"\nand ünïcode"}};
  save_safetensors(p, {{"w", DType::F32, {2}, pattern(8, 1)}}, meta);
  SafetensorsFile f(p);
  EXPECT_EQ(f.metadata(), meta);
  ASSERT_EQ(f.tensors().size(), 1u);
}

TEST(Safetensors, EmptyFileHasNoTensors) {
  ScratchDir dir;
  const fs::path p = dir / "empty.safetensors";
  save_safetensors(p, {}, {{"k", "v"}});
  SafetensorsFile f(p);
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_EQ(f.metadata().at("k"), "v");
}

TEST(Safetensors, ReadsUnpaddedHandWrittenFile) {
  ScratchDir dir;
  const fs::path p = dir / "hand.safetensors";
  // Zero-size tensors may share an offset with their neighbours.
  write_bytes(p, raw_file(R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                          R"("e":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},)"
                          R"("a":{"dtype":"U8","shape":[1],"data_offsets":[2,3]},"x":{"dtype":"I8","shape":[],"data_offsets":[3,4]}})",
                          "\x01\x02\x03\x04"));
  SafetensorsFile f(p);
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.tensors()[0].name, "b");
  EXPECT_EQ(f.tensors()[1].name, "e");
  EXPECT_EQ(f.tensors()[2].name, "a");
  EXPECT_EQ(to_vec(f.data(*f.find("a"))), std::vector<uint8_t>{3});
  EXPECT_EQ(f.find("x")->shape, Shape{});
  EXPECT_TRUE(f.data(*f.find("e")).empty());
}

TEST(Safetensors, WriterStreamsAcrossTensors) {
  ScratchDir dir;
  const fs::path p = dir / "stream.safetensors";
  const std::vector<TensorSpec> specs = {{"a", DType::F32, {3}}, {"empty", DType::BF16, {0}},
                                         {"b", DType::U16, {5}}, {"c", DType::U8, {}}};
  const std::vector<uint8_t> all = pattern(12 + 10 + 1, 9);
  {
    SafetensorsWriter w(p, specs, {{"writer", "stream"}});
    // Pieces of 5 straddle every tensor boundary.
    for (size_t i = 0; i < all.size(); i += 5) w.write(all.data() + i, std::min<size_t>(5, all.size() - i));
    EXPECT_FALSE(fs::exists(p));
    w.commit();
  }
  SafetensorsFile f(p);
  EXPECT_EQ(to_vec(f.data(*f.find("a"))), std::vector<uint8_t>(all.begin(), all.begin() + 12));
  EXPECT_EQ(to_vec(f.data(*f.find("b"))), std::vector<uint8_t>(all.begin() + 12, all.begin() + 22));
  EXPECT_EQ(to_vec(f.data(*f.find("c"))), std::vector<uint8_t>{all[22]});
  EXPECT_EQ(f.find("empty")->nbytes(), 0u);
  EXPECT_EQ(f.metadata().at("writer"), "stream");
}

TEST(Safetensors, WriterShortWriteLeavesNothing) {
  ScratchDir dir;
  const fs::path p = dir / "short.safetensors";
  SafetensorsWriter w(p, {{"a", DType::F32, {4}}, {"b", DType::F32, {1}}});
  w.write(pattern(10, 0));
  try {
    w.commit();
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    expect_mentions(e.what(), {p.string(), "10 of 20", "'a'"});
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(Safetensors, WriterOverlongWriteFails) {
  ScratchDir dir;
  const fs::path p = dir / "long.safetensors";
  SafetensorsWriter w(p, {{"a", DType::U8, {4}}});
  w.write(pattern(3, 0));
  try {
    w.write(pattern(3, 0));
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    expect_mentions(e.what(), {p.string(), "more than"});
  }
  EXPECT_THROW(w.commit(), Error);
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(Safetensors, WriterWithoutCommitLeavesNothing) {
  ScratchDir dir;
  {
    SafetensorsWriter w(dir / "x.safetensors", {{"a", DType::U8, {1}}});
    w.write(pattern(1, 0));
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(Safetensors, WriterRejectsBadSpecs) {
  ScratchDir dir;
  const fs::path p = dir / "bad.safetensors";
  try {
    SafetensorsWriter w(p, {{"a", DType::U8, {1}}, {"b", DType::U8, {1}}, {"a", DType::F32, {2}}});
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    expect_mentions(e.what(), {p.string(), "'a'", "twice"});
  }
  EXPECT_THROW(SafetensorsWriter(p, {{"__metadata__", DType::U8, {1}}}), Error);
  EXPECT_THROW(SafetensorsWriter(p, {{"neg", DType::U8, {-1}}}), Error);
  EXPECT_THROW(SafetensorsWriter(p, {{"huge", DType::F64, {int64_t(1) << 61}}}), Error);
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

TEST(Safetensors, HeaderJsonMatchesWriter) {
  ScratchDir dir;
  const std::vector<TensorSpec> specs = {{"w", DType::F16, {2, 3}}, {"b", DType::F32, {3}}};
  const std::map<std::string, std::string> meta = {{"format", "pt"}};
  const std::string header = safetensors_header_json(specs, meta);
  const auto j = nlohmann::json::parse(header);
  EXPECT_EQ(j["w"]["data_offsets"], nlohmann::json({0, 12}));
  EXPECT_EQ(j["b"]["data_offsets"], nlohmann::json({12, 24}));
  EXPECT_EQ(j["__metadata__"]["format"], "pt");
  EXPECT_FALSE(nlohmann::json::parse(safetensors_header_json(specs)).contains("__metadata__"));

  const fs::path p = dir / "h.safetensors";
  SafetensorsWriter w(p, specs, meta);
  w.write(pattern(24, 0));
  w.commit();
  const std::string raw = read_bytes(p);
  EXPECT_EQ(raw.substr(8, header.size()), header);
  // A header padded with spaces to any length stays readable.
  write_bytes(dir / "pad.safetensors", raw_file(header + std::string(37, ' '), raw.substr(raw.size() - 24)));
  EXPECT_EQ(SafetensorsFile(dir / "pad.safetensors").tensors().size(), 2u);

  EXPECT_THROW(safetensors_header_json({{"a", DType::U8, {1}}, {"a", DType::U8, {1}}}), Error);
  EXPECT_THROW(safetensors_header_json({{"bad\xff", DType::U8, {1}}}), Error);
}

TEST(Safetensors, SaveRejectsWrongByteCount) {
  ScratchDir dir;
  const fs::path p = dir / "w.safetensors";
  try {
    save_safetensors(p, {{"ok", DType::U8, {1}, {1}}, {"layer.0.w", DType::F16, {2, 2}, pattern(7, 0)}});
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    expect_mentions(e.what(), {p.string(), "layer.0.w", "8 bytes", "got 7"});
  }
  EXPECT_TRUE(fs::is_empty(dir.path()));
}

// ---------------------------------------------------- malformed files ----

TEST(Safetensors, RejectsTruncatedFile) {
  ScratchDir dir;
  expect_open_fails(dir, "empty.safetensors", "", {"0 bytes", "too short"});
  expect_open_fails(dir, "five.safetensors", std::string("\x05\x00\x00\x00\x00", 5), {"5 bytes", "too short"});
  // A valid file cut inside its data section.
  const std::string ok = raw_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(16, 'x'));
  expect_open_fails(dir, "cut.safetensors", ok.substr(0, ok.size() - 3), {"'a'", "past the end"});
  // ... and inside its header.
  expect_open_fails(dir, "cuthdr.safetensors", ok.substr(0, 20), {"header length", "exceeds file size"});
}

TEST(Safetensors, RejectsLyingHeaderLength) {
  ScratchDir dir;
  const std::string header = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  expect_open_fails(dir, "lie.safetensors", le64(1000) + header + "x",
                    {"header length 1000", "exceeds file size " + std::to_string(8 + header.size() + 1)});
  expect_open_fails(dir, "zero.safetensors", le64(0) + header + "x", {"header length is 0"});
  // Too short a length leaves the JSON cut off.
  expect_open_fails(dir, "short.safetensors", le64(10) + header + "x", {"not valid JSON"});
}

TEST(Safetensors, RejectsHugeHeaderLength) {
  ScratchDir dir;
  expect_open_fails(dir, "huge.safetensors", le64(uint64_t(1) << 63) + "{}", {"header length 9223372036854775808"});
  expect_open_fails(dir, "max.safetensors", le64(~uint64_t(0)) + "{}", {"header length 18446744073709551615"});
  expect_open_fails(dir, "limit.safetensors", le64(100'000'001) + "{}", {"header length 100000001", "100000000"});
}

TEST(Safetensors, RejectsBadJson) {
  ScratchDir dir;
  expect_open_fails(dir, "bad.safetensors", raw_file(R"({"a": {"dtype": )", ""), {"not valid JSON", "parse error"});
  expect_open_fails(dir, "trail.safetensors", raw_file("{} x", ""), {"not valid JSON"});
  expect_open_fails(dir, "utf8.safetensors", raw_file("{\"\xff\":1}", ""), {"not valid JSON"});
}

TEST(Safetensors, RejectsNonObjectHeader) {
  ScratchDir dir;
  expect_open_fails(dir, "array.safetensors", raw_file("[1, 2]", ""), {"not a JSON object", "array"});
  expect_open_fails(dir, "number.safetensors", raw_file("42", ""), {"not a JSON object"});
}

TEST(Safetensors, RejectsUnknownDtype) {
  ScratchDir dir;
  expect_open_fails(dir, "f7.safetensors",
                    raw_file(R"({"layer.w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}})", "x"),
                    {"'layer.w'", "'F7'", std::string(dtype_all_names())});
  expect_open_fails(dir, "num.safetensors",
                    raw_file(R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,1]}})", "x"), {"'w'", "dtype must be a string"});
}

TEST(Safetensors, RejectsBadEntries) {
  ScratchDir dir;
  expect_open_fails(dir, "notobj.safetensors", raw_file(R"({"w":[1,2]})", ""), {"'w'", "must be an object"});
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    nlohmann::json entry = {{"dtype", "U8"}, {"shape", {1}}, {"data_offsets", {0, 1}}};
    entry.erase(key);
    expect_open_fails(dir, str("missing_", key, ".safetensors"), raw_file(nlohmann::json{{"w", entry}}.dump(), "x"),
                      {"'w'", str("missing \"", key, "\"")});
  }
  auto with = [](const std::string& shape, const std::string& offsets) {
    return raw_file(str(R"({"w":{"dtype":"U8","shape":)", shape, R"(,"data_offsets":)", offsets, "}}"), "xxxx");
  };
  expect_open_fails(dir, "shape_neg.safetensors", with("[-1]", "[0,4]"), {"'w'", "non-negative integers"});
  expect_open_fails(dir, "shape_frac.safetensors", with("[1.5]", "[0,4]"), {"'w'", "non-negative integers"});
  expect_open_fails(dir, "shape_str.safetensors", with(R"(["4"])", "[0,4]"), {"'w'", "non-negative integers", "string"});
  expect_open_fails(dir, "shape_obj.safetensors", with("{}", "[0,4]"), {"'w'", "shape must be an array"});
  expect_open_fails(dir, "shape_big.safetensors", with("[18446744073709551615]", "[0,4]"), {"'w'", "non-negative integers"});
  expect_open_fails(dir, "shape_ovf.safetensors", with("[4294967296, 4294967296]", "[0,4]"), {"'w'", "64 bits"});
  expect_open_fails(dir, "off_3.safetensors", with("[4]", "[0,2,4]"), {"'w'", "[begin, end]", "3 entries"});
  expect_open_fails(dir, "off_neg.safetensors", with("[4]", "[-4,0]"), {"'w'", "non-negative integers"});
  expect_open_fails(dir, "off_rev.safetensors", with("[0]", "[4,0]"), {"'w'", "begin is after end"});
  expect_open_fails(dir, "off_str.safetensors", with("[4]", R"("0-4")"), {"'w'", "[begin, end]", "string"});
}

TEST(Safetensors, RejectsShapeBytesMismatch) {
  ScratchDir dir;
  expect_open_fails(dir, "mismatch.safetensors",
                    raw_file(R"({"attn.q":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", std::string(12, 'x')),
                    {"'attn.q'", "[2, 2]", "F32", "needs 16 bytes", "hold 12"});
  // A shape whose byte size overflows although its element count does not.
  expect_open_fails(dir, "ovf.safetensors",
                    raw_file(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", std::string(8, 'x')),
                    {"'w'", "overflow"});
}

TEST(Safetensors, RejectsOverlappingRanges) {
  ScratchDir dir;
  expect_open_fails(dir, "overlap.safetensors",
                    raw_file(R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},)"
                             R"("b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}})",
                             std::string(12, 'x')),
                    {"'b'", "overlap", "'a'"});
  // Two tensors over the very same bytes.
  expect_open_fails(dir, "alias.safetensors",
                    raw_file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})",
                             std::string(4, 'x')),
                    {"overlap"});
}

TEST(Safetensors, RejectsHoleBetweenTensors) {
  ScratchDir dir;
  expect_open_fails(dir, "hole.safetensors",
                    raw_file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}})",
                             std::string(12, 'x')),
                    {"hole", "'b'", "begins at 8", "expected 4", "'a'"});
  expect_open_fails(dir, "lead.safetensors",
                    raw_file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})", std::string(8, 'x')),
                    {"hole", "'a'", "begins at 4", "expected 0"});
}

TEST(Safetensors, RejectsTrailingBytes) {
  ScratchDir dir;
  expect_open_fails(dir, "trailing.safetensors",
                    raw_file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})", std::string(7, 'x')),
                    {"3 trailing bytes"});
  expect_open_fails(dir, "onlytrail.safetensors", raw_file("{}", "x"), {"1 trailing bytes"});
}

TEST(Safetensors, RejectsBadMetadata) {
  ScratchDir dir;
  expect_open_fails(dir, "metanum.safetensors", raw_file(R"({"__metadata__":{"format":"pt","epoch":3}})", ""),
                    {"__metadata__", "'epoch'", "string", "number"});
  expect_open_fails(dir, "metaarr.safetensors", raw_file(R"({"__metadata__":["pt"]})", ""),
                    {"__metadata__", "object of strings"});
}

TEST(Safetensors, RejectsDuplicateTensorName) {
  ScratchDir dir;
  expect_open_fails(dir, "dup.safetensors",
                    raw_file(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                             R"("a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                             std::string(8, 'x')),
                    {"'a'", "more than once"});
}

TEST(Safetensors, MissingFileErrorNamesPath) {
  ScratchDir dir;
  const fs::path p = dir / "nope.safetensors";
  expect_mentions(open_error(p), {p.string()});
}

// Deterministic mutations of a valid file: every one must either open or
// throw qlora::Error; a crash, hang or other exception fails the test (and
// a run under ASan/UBSan also catches out-of-bounds reads).
TEST(Safetensors, MutatedFilesOpenOrThrowError) {
  ScratchDir dir;
  const fs::path src = dir / "valid.safetensors";
  save_safetensors(src,
                   {{"embed", DType::BF16, {4, 3}, pattern(24, 1)},
                    {"norm", DType::F32, {3}, pattern(12, 2)},
                    {"scalar", DType::I64, {}, pattern(8, 3)},
                    {"none", DType::U8, {0, 2}, {}}},
                   {{"format", "pt"}});
  const std::string valid = read_bytes(src);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | uint8_t(valid[size_t(i)]);
  const size_t header_end = size_t(8 + header_len);

  std::mt19937_64 rng(20240601);
  static const char kJsonChars[] = "{}[]\":,0123456789-.eE \\u\x00\xff";
  const std::string json_chars(kJsonChars, sizeof kJsonChars - 1);
  const fs::path p = dir / "mutant.safetensors";
  int opened = 0, rejected = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    std::string m = valid;
    switch (iter % 5) {
      case 0:  // flip bits anywhere in the length field and header
        for (int k = 0, n = 1 + int(rng() % 4); k < n; ++k) m[rng() % header_end] ^= char(1u << (rng() % 8));
        break;
      case 1:  // replace header bytes with JSON punctuation
        for (int k = 0, n = 1 + int(rng() % 3); k < n; ++k)
          m[8 + rng() % header_len] = json_chars[rng() % json_chars.size()];
        break;
      case 2:  // truncate
        m.resize(rng() % (m.size() + 1));
        break;
      case 3: {  // a different header length: near the true one, or anything at all
        const uint64_t r = rng();
        const uint64_t len = (r & 1) ? header_len + (r >> 1) % 64 - 32 : r >> (rng() % 64);
        m.replace(0, 8, le64(len));
        break;
      }
      case 4:  // change a digit, i.e. an offset, a shape or a length
        for (size_t tries = 0; tries < 64; ++tries) {
          const size_t at = 8 + rng() % header_len;
          if (m[at] >= '0' && m[at] <= '9') {
            m[at] = char('0' + rng() % 10);
            if (rng() % 4 == 0) m.insert(at, 1, char('0' + rng() % 10));
            break;
          }
        }
        if (m.size() != valid.size()) m.replace(0, 8, le64(header_len + (m.size() - valid.size())));
        break;
    }
    write_bytes(p, m);
    try {
      SafetensorsFile f(p);
      ++opened;
      uint64_t total = 0;
      for (const TensorInfo& t : f.tensors()) {
        const auto d = f.data(t);
        ASSERT_EQ(d.size(), t.nbytes());
        total += d.size();
      }
      EXPECT_LE(total, f.file_size());
    } catch (const Error& e) {
      ++rejected;
      ASSERT_NE(std::string(e.what()).find(p.string()), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      FAIL() << "mutation " << iter << ": not a qlora::Error: " << e.what();
    }
  }
  EXPECT_GT(rejected, 1000);  // of 2000
  EXPECT_GT(opened, 0);  // some mutations (e.g. inside metadata text) stay valid
}

// --------------------------------------------------------------- models ----

// Writes two shards and their index; returns the tensor contents by name.
std::map<std::string, std::vector<uint8_t>> write_two_shards(const fs::path& dir) {
  std::map<std::string, std::vector<uint8_t>> bytes = {
      {"a.weight", pattern(16, 1)}, {"b.weight", pattern(8, 2)}, {"c.bias", pattern(4, 3)}, {"d", pattern(2, 4)}};
  save_safetensors(dir / "model-00001-of-00002.safetensors",
                   {{"c.bias", DType::F32, {1}, bytes["c.bias"]}, {"a.weight", DType::F32, {2, 2}, bytes["a.weight"]}});
  save_safetensors(dir / "model-00002-of-00002.safetensors",
                   {{"b.weight", DType::BF16, {4}, bytes["b.weight"]}, {"d", DType::U8, {2}, bytes["d"]}});
  write_safetensors_index(dir / "model.safetensors.index.json", 30,
                          {{"a.weight", "model-00001-of-00002.safetensors"},
                           {"c.bias", "model-00001-of-00002.safetensors"},
                           {"b.weight", "model-00002-of-00002.safetensors"},
                           {"d", "model-00002-of-00002.safetensors"}});
  return bytes;
}

TEST(Safetensors, ModelFromSingleFileAndFolder) {
  ScratchDir dir;
  save_safetensors(dir / "model.safetensors",
                   {{"z", DType::U8, {1}, {7}}, {"a", DType::U16, {2}, {1, 2, 3, 4}}});
  for (const fs::path& src : {dir / "model.safetensors", dir.path()}) {
    SafetensorsModel m(src);
    EXPECT_EQ(m.source(), src);
    EXPECT_EQ(m.names(), (std::vector<std::string>{"a", "z"}));
    ASSERT_EQ(m.files().size(), 1u);
    EXPECT_EQ(m.total_bytes(), 5u);
    EXPECT_EQ(to_vec(m.data("a")), (std::vector<uint8_t>{1, 2, 3, 4}));
    EXPECT_EQ(m.at("z").info->dtype, DType::U8);
    EXPECT_EQ(m.at("z").file, m.files()[0].get());
    EXPECT_EQ(m.find("missing"), nullptr);
    try {
      m.at("missing.weight");
      FAIL() << "expected an Error";
    } catch (const Error& e) {
      expect_mentions(e.what(), {src.string(), "missing.weight"});
    }
  }
}

TEST(Safetensors, ModelTwoShardsThroughIndex) {
  ScratchDir dir;
  const auto bytes = write_two_shards(dir.path());
  SafetensorsModel m(dir.path());
  EXPECT_EQ(m.names(), (std::vector<std::string>{"a.weight", "b.weight", "c.bias", "d"}));
  EXPECT_EQ(m.files().size(), 2u);
  EXPECT_EQ(m.total_bytes(), 30u);
  for (const auto& [name, b] : bytes) EXPECT_EQ(to_vec(m.data(name)), b) << name;
  EXPECT_EQ(m.at("b.weight").info->dtype, DType::BF16);
  EXPECT_EQ(m.at("a.weight").file, m.at("c.bias").file);
  EXPECT_NE(m.at("a.weight").file, m.at("d").file);
  EXPECT_EQ(m.at("d").file->path(), dir / "model-00002-of-00002.safetensors");

  // The index is the Hugging Face layout, indented by 2.
  const std::string text = read_bytes(dir / "model.safetensors.index.json");
  EXPECT_NE(text.find("\n  \"metadata\""), std::string::npos) << text;
  const auto j = nlohmann::json::parse(text);
  EXPECT_EQ(j["metadata"]["total_size"], 30);
  EXPECT_EQ(j["weight_map"]["d"], "model-00002-of-00002.safetensors");

  // The index itself may be given too.
  SafetensorsModel by_index(dir / "model.safetensors.index.json");
  EXPECT_EQ(by_index.names(), m.names());
}

TEST(Safetensors, ModelIndexTensorMissingFromShard) {
  ScratchDir dir;
  write_two_shards(dir.path());
  const fs::path index = dir / "model.safetensors.index.json";
  write_safetensors_index(index, 0,
                          {{"a.weight", "model-00001-of-00002.safetensors"},
                           {"c.bias", "model-00001-of-00002.safetensors"},
                           {"ghost", "model-00001-of-00002.safetensors"},
                           {"b.weight", "model-00002-of-00002.safetensors"},
                           {"d", "model-00002-of-00002.safetensors"}});
  expect_mentions(model_error(dir.path()), {index.string(), "'ghost'", "model-00001-of-00002.safetensors"});
}

TEST(Safetensors, ModelIndexMissesShardTensor) {
  ScratchDir dir;
  write_two_shards(dir.path());
  const fs::path index = dir / "model.safetensors.index.json";
  write_safetensors_index(index, 0,
                          {{"a.weight", "model-00001-of-00002.safetensors"},
                           {"b.weight", "model-00002-of-00002.safetensors"},
                           {"d", "model-00002-of-00002.safetensors"}});
  expect_mentions(model_error(dir.path()), {index.string(), "'c.bias'", "model-00001-of-00002.safetensors"});
}

TEST(Safetensors, ModelIndexMissingShard) {
  ScratchDir dir;
  write_two_shards(dir.path());
  fs::remove(dir / "model-00002-of-00002.safetensors");
  expect_mentions(model_error(dir.path()), {(dir / "model-00002-of-00002.safetensors").string(), "does not exist"});
}

TEST(Safetensors, ModelIndexSameNameInTwoShards) {
  ScratchDir dir;
  write_two_shards(dir.path());
  save_safetensors(dir / "model-00002-of-00002.safetensors",
                   {{"b.weight", DType::BF16, {4}, pattern(8, 2)}, {"d", DType::U8, {2}, pattern(2, 4)},
                    {"a.weight", DType::F32, {2, 2}, pattern(16, 1)}});
  expect_mentions(model_error(dir.path()), {"'a.weight'", "two shards", "model-00001-of-00002.safetensors",
                                            "model-00002-of-00002.safetensors"});
}

TEST(Safetensors, ModelIndexMalformed) {
  ScratchDir dir;
  const fs::path index = dir / "model.safetensors.index.json";
  write_bytes(index, "{\"weight_map\": ");
  expect_mentions(model_error(dir.path()), {index.string(), "not valid JSON"});
  write_bytes(index, R"({"metadata": {}})");
  expect_mentions(model_error(dir.path()), {index.string(), "weight_map"});
  write_bytes(index, R"({"weight_map": {"a": 1}})");
  expect_mentions(model_error(dir.path()), {index.string(), "'a'"});
  // A shard that is itself malformed is reported by its own path.
  write_bytes(dir / "bad.safetensors", "xx");
  write_bytes(index, R"({"weight_map": {"a": "bad.safetensors"}})");
  expect_mentions(model_error(dir.path()), {(dir / "bad.safetensors").string(), "too short"});
  // Shard names are file names beside the index, never paths.
  write_bytes(index, R"({"weight_map": {"a": "../outside.safetensors"}})");
  expect_mentions(model_error(dir.path()), {index.string(), "expected a file name in the same folder"});
  write_bytes(index, R"({"weight_map": {"a": "/etc/passwd"}})");
  expect_mentions(model_error(dir.path()), {index.string(), "/etc/passwd"});
}

TEST(Safetensors, ModelMissingSources) {
  ScratchDir dir;
  expect_mentions(model_error(dir.path()), {"no model.safetensors or model.safetensors.index.json in " + dir.path().string()});
  const fs::path gone = dir / "gone";
  expect_mentions(model_error(gone), {gone.string()});
  expect_mentions(model_error(dir / "gone.safetensors"), {(dir / "gone.safetensors").string()});
}

TEST(Safetensors, StoriesFixture) {
  QLORA_REQUIRE_FIXTURES(fx);
  const fs::path p = fx / "models/stories260K/hf/model.safetensors";
  SafetensorsFile f(p);
  const TensorInfo* embed = f.find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->dtype, DType::F32);
  EXPECT_EQ(embed->shape.size(), 2u);
  EXPECT_EQ(f.data(*embed).size(), uint64_t(embed->numel()) * 4);
  SafetensorsModel m(p.parent_path());
  EXPECT_EQ(m.names().size(), f.tensors().size());
}

}  // namespace
}  // namespace qlora
