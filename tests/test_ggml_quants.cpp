// ggml (llama.cpp) block types -> fp32, bit for bit as gguf-py computes them
// (the independent reference tests/reference/make_ggml_golden.py, whose
// header says why its float order is ggml's C order for every type). If the
// golden file is missing or of another version, re-run:
//   python3 -m venv /tmp/gv && /tmp/gv/bin/pip install gguf==0.19.0 numpy==2.4.6
//   /tmp/gv/bin/python tests/reference/make_ggml_golden.py
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/safetensors.h"
#include "quant/ggml_quants.h"
#include "quant/ggml_quants_blocks.h"
#include "testing.h"

namespace qlora {
namespace {

constexpr const char* kRegen =
    "re-run: python3 -m venv /tmp/gv && /tmp/gv/bin/pip install gguf==0.19.0 numpy==2.4.6 && "
    "/tmp/gv/bin/python tests/reference/make_ggml_golden.py";

const SafetensorsFile& golden() {
  static const SafetensorsFile f(std::string(QLORA_SOURCE_DIR) + "/tests/reference/ggml_golden.safetensors");
  return f;
}

template <typename T>
std::vector<T> tensor(const std::string& name) {
  return testing::golden_tensor<T>(golden(), name, kRegen);
}

const GgmlType kSupported[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0,
                               GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q2_K, GgmlType::Q3_K,
                               GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K};

// Bit patterns, so -0.0 vs 0.0 and NaN payloads count as differences.
std::vector<uint32_t> bits(const std::vector<float>& v) {
  std::vector<uint32_t> b(v.size());
  std::memcpy(b.data(), v.data(), v.size() * 4);
  return b;
}

// Index and values of the first difference, or "" when equal.
std::string first_difference(const std::vector<float>& want, const std::vector<float>& got) {
  if (want.size() != got.size()) return str("sizes differ: ", want.size(), " vs ", got.size());
  const auto a = bits(want), b = bits(got);
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i])
      return str("value ", i, ": expected ", want[i], " (0x", std::hex, a[i], "), got ", got[i], " (0x", b[i],
                 ")");
  return "";
}

TEST(GgmlGolden, FileIsTheExpectedVersion) {
  const auto& m = golden().metadata();
  ASSERT_EQ(m.count("magic"), 1u) << kRegen;
  EXPECT_EQ(m.at("magic"), "qlora-ggml-golden") << kRegen;
  EXPECT_EQ(m.at("version"), "1") << kRegen;
  EXPECT_EQ(m.at("gguf"), "0.19.0") << kRegen;
  EXPECT_EQ(m.at("numpy"), "2.4.6") << kRegen;
}

TEST(GgmlGolden, RefIsBitExactForEveryType) {
  for (GgmlType t : kSupported) {
    const std::string name(ggml_type_name(t));
    SCOPED_TRACE(name);
    const auto in = tensor<uint8_t>(name + "/input");
    const auto want = tensor<float>(name + "/output");
    ASSERT_FALSE(want.empty()) << kRegen;
    const auto n = int64_t(want.size());
    ASSERT_EQ(ggml_nbytes(t, n), in.size());
    std::vector<float> got(want.size());
    ggml_dequantize_ref(t, in.data(), n, got.data());
    EXPECT_EQ(first_difference(want, got), "");
    std::vector<float> fast(want.size());
    ggml_dequantize(t, in.data(), n, fast.data());
    EXPECT_EQ(first_difference(want, fast), "");
  }
}

// Many blocks of random bytes with random finite fp16 scales, so OpenMP
// splits them: the fast path equals the reference bit for bit.
TEST(GgmlQuants, FastPathEqualsRefOnLargeInputs) {
  std::mt19937 rng(7);
  for (GgmlType t : kSupported) {
    const GgmlTypeTraits tr = ggml_traits(t);
    SCOPED_TRACE(std::string(tr.name));
    const int64_t n = tr.block_values == 1 ? 300007 : 1536 * tr.block_values + tr.block_values * 3;
    std::vector<uint8_t> src(*ggml_nbytes(t, n));
    for (auto& b : src) b = uint8_t(rng());
    // Keep fp16 values finite (random Inf/NaN bytes would make both paths
    // produce NaN, hiding differences): clear the top exponent bit of every
    // 16-bit word whose exponent is all ones. F32/BF16 are bit copies, left raw.
    if (t != GgmlType::F32 && t != GgmlType::BF16)
      for (size_t i = 0; i + 1 < src.size(); i += 2)
        if ((src[i + 1] & 0x7C) == 0x7C) src[i + 1] &= 0xBF;
    std::vector<float> ref(testing::sz(n)), fast(testing::sz(n), -1.0f);
    ggml_dequantize_ref(t, src.data(), n, ref.data());
    ggml_dequantize(t, src.data(), n, fast.data());
    EXPECT_EQ(first_difference(ref, fast), "");
  }
}

TEST(GgmlQuants, FastF16ConversionMatchesCoreForAllInputs) {
  for (uint32_t h = 0; h < 65536; ++h)
    ASSERT_EQ(f32_bits(ggml_f16_to_f32_fast(uint16_t(h))), f32_bits(f16_to_f32(uint16_t(h))))
        << "0x" << std::hex << h;
}

TEST(GgmlQuants, RefusesOtherTypesByName) {
  const std::string names = ggml_dequantizable_names();
  EXPECT_EQ(names, "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K");
  for (GgmlType t : kSupported) EXPECT_TRUE(ggml_can_dequantize(t));
  const GgmlType refused[] = {GgmlType::IQ2_XXS, GgmlType::IQ4_NL, GgmlType::TQ1_0, GgmlType::MXFP4,
                              GgmlType::Q8_1,    GgmlType::Q8_K,   GgmlType::I8,    GgmlType::F64};
  std::vector<uint8_t> src(4096);
  std::vector<float> dst(4096);
  for (GgmlType t : refused) {
    const std::string name(ggml_type_name(t));
    EXPECT_FALSE(ggml_can_dequantize(t)) << name;
    const int64_t n = ggml_traits(t).block_values;
    for (auto* fn : {&ggml_dequantize_ref, &ggml_dequantize}) {
      const std::string msg = testing::error_of([&] { fn(t, src.data(), n, dst.data()); });
      EXPECT_EQ(msg, "GGUF type " + name + " cannot be dequantized; supported: " + names);
    }
  }
  const std::string msg =
      testing::error_of([&] { ggml_dequantize(GgmlType(99), src.data(), 1, dst.data()); });
  EXPECT_NE(msg.find("GGUF type id 99 cannot be dequantized"), std::string::npos) << msg;
}

TEST(GgmlQuants, RefusesPartialBlocks) {
  std::vector<uint8_t> src(4096);
  std::vector<float> dst(1024);
  for (auto* fn : {&ggml_dequantize_ref, &ggml_dequantize}) {
    EXPECT_EQ(testing::error_of([&] { fn(GgmlType::Q4_K, src.data(), 300, dst.data()); }),
              "GGUF type Q4_K: 300 values is not a whole number of blocks of 256");
    EXPECT_EQ(testing::error_of([&] { fn(GgmlType::Q8_0, src.data(), 33, dst.data()); }),
              "GGUF type Q8_0: 33 values is not a whole number of blocks of 32");
    EXPECT_NE(testing::error_of([&] { fn(GgmlType::F16, src.data(), -1, dst.data()); }), "");
  }
  EXPECT_EQ(testing::error_of([&] { ggml_quantize_q8_0(dst.data(), 48, src.data()); }),
            "GGUF type Q8_0: 48 values is not a whole number of blocks of 32");
}

// The golden Q8_0 case has exact ties (x*id = k + 0.5): ggml's C rounds them
// away from zero with roundf, and so does gguf-py (its np_roundf; the script
// asserts it), so the golden is followed bit for bit.
TEST(GgmlGolden, QuantizeQ8_0MatchesGgml) {
  const auto x = tensor<float>("q8_0_quantize/input");
  const auto want = tensor<uint8_t>("q8_0_quantize/output");
  ASSERT_EQ(x.size() % 32, 0u) << kRegen;
  std::vector<uint8_t> got(*ggml_nbytes(GgmlType::Q8_0, int64_t(x.size())));
  ggml_quantize_q8_0(x.data(), int64_t(x.size()), got.data());
  EXPECT_EQ(got, want);
  // The tie block is the last one: 0.5, 1.5, 2.5, -0.5, ... with amax 127.
  const auto* last = reinterpret_cast<const BlockQ8_0*>(got.data()) + (x.size() / 32 - 1);
  EXPECT_EQ(last->qs[0], 1);
  EXPECT_EQ(last->qs[2], 3);
  EXPECT_EQ(last->qs[5], -3);
}

// quant/ggml_types.cpp's table against gguf-py's GGML_QUANT_SIZES, and the
// block structs against the table.
TEST(GgmlGolden, TypeSizesMatchGguf) {
  const auto rows = tensor<int32_t>("sizes");
  ASSERT_EQ(rows.size() % 3, 0u) << kRegen;
  const std::string names_csv = golden().metadata().at("size_names");
  std::vector<std::string> names;
  for (size_t p = 0, q; p <= names_csv.size(); p = q + 1) {
    q = names_csv.find(',', p);
    if (q == std::string::npos) q = names_csv.size();
    names.push_back(names_csv.substr(p, q - p));
  }
  ASSERT_EQ(names.size(), rows.size() / 3) << kRegen;
  std::vector<bool> seen(64, false);
  for (size_t r = 0; r < names.size(); ++r) {
    const auto id = uint32_t(rows[3 * r]);
    const auto tr = ggml_type_traits(id);
    if (!tr) continue;  // a type gguf-py knows and ggml_types does not list (yet)
    SCOPED_TRACE(names[r]);
    if (id < seen.size()) seen[id] = true;
    EXPECT_EQ(tr->name, names[r]);
    EXPECT_EQ(tr->block_values, rows[3 * r + 1]);
    if (tr->type == GgmlType::Q8_1) {
      // gguf-py still has Q8_1's old layout (fp32 d and s: 40 bytes); ggml-common.h
      // has fp16 d and s since 2024 (static_assert: 2*sizeof(ggml_half) + 32 = 36).
      // ggml's C is the definition; Q8_1 is a dot-product scratch type never
      // stored in GGUF files. When gguf-py is fixed, this branch should go.
      EXPECT_EQ(tr->block_bytes, 36);
      EXPECT_EQ(rows[3 * r + 2], 40) << "gguf-py fixed Q8_1: drop this exception";
      continue;
    }
    EXPECT_EQ(tr->block_bytes, rows[3 * r + 2]);
  }
  for (uint32_t id = 0; id < 64; ++id) {
    if (!ggml_type_traits(id)) continue;
    EXPECT_TRUE(seen[id]) << "ggml_types lists id " << id << ", gguf-py does not";
  }

  EXPECT_EQ(ggml_traits(GgmlType::Q4_0).block_bytes, int64_t(sizeof(BlockQ4_0)));
  EXPECT_EQ(ggml_traits(GgmlType::Q4_1).block_bytes, int64_t(sizeof(BlockQ4_1)));
  EXPECT_EQ(ggml_traits(GgmlType::Q5_0).block_bytes, int64_t(sizeof(BlockQ5_0)));
  EXPECT_EQ(ggml_traits(GgmlType::Q5_1).block_bytes, int64_t(sizeof(BlockQ5_1)));
  EXPECT_EQ(ggml_traits(GgmlType::Q8_0).block_bytes, int64_t(sizeof(BlockQ8_0)));
  EXPECT_EQ(ggml_traits(GgmlType::Q2_K).block_bytes, int64_t(sizeof(BlockQ2_K)));
  EXPECT_EQ(ggml_traits(GgmlType::Q3_K).block_bytes, int64_t(sizeof(BlockQ3_K)));
  EXPECT_EQ(ggml_traits(GgmlType::Q4_K).block_bytes, int64_t(sizeof(BlockQ4_K)));
  EXPECT_EQ(ggml_traits(GgmlType::Q5_K).block_bytes, int64_t(sizeof(BlockQ5_K)));
  EXPECT_EQ(ggml_traits(GgmlType::Q6_K).block_bytes, int64_t(sizeof(BlockQ6_K)));
}

}  // namespace
}  // namespace qlora
