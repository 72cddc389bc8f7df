// Bit-for-bit agreement with bitsandbytes' algorithm, as computed by the
// independent reference tests/reference/make_quant_golden.py (torch + numpy).
// If this file's format changes, re-run:
//   /usr/bin/python3 tests/reference/make_quant_golden.py
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "testing.h"
#include "quant/blockwise.h"
#include "quant/bnb_layout.h"
#include "quant/dynamic_map.h"

namespace qlora {
namespace {

constexpr const char* kRegen = "re-run /usr/bin/python3 tests/reference/make_quant_golden.py";

const SafetensorsFile& golden() {
  static const SafetensorsFile f(std::string(QLORA_SOURCE_DIR) + "/tests/reference/quant_golden.safetensors");
  return f;
}

template <typename T>
std::vector<T> tensor(const std::string& name) {
  return testing::golden_tensor<T>(golden(), name, kRegen);
}

TEST(QuantGolden, FileIsTheExpectedVersion) {
  const auto& m = golden().metadata();
  ASSERT_EQ(m.count("magic"), 1u) << kRegen;
  EXPECT_EQ(m.at("magic"), "qlora-quant-golden") << kRegen;
  EXPECT_EQ(m.at("version"), "1") << kRegen;
}

TEST(QuantGolden, DynamicMapMatchesTorch) {
  const auto expect = tensor<float>("dynamic_map");
  ASSERT_EQ(expect.size(), 256u);
  const auto& m = dynamic_map_signed();
  for (size_t i = 0; i < 256; ++i) EXPECT_EQ(m[i], expect[i]) << "index " << i;
}

// Every "<case>/<type>/b<block>/codes" entry in the golden file.
struct GoldenCase {
  std::string prefix, input;
  Quant4Type type;
  int64_t block;
};

std::vector<GoldenCase> golden_cases() {
  std::vector<GoldenCase> out;
  for (const TensorInfo& t : golden().tensors()) {
    const std::string& n = t.name;
    const std::string suffix = "/codes";
    if (n.size() < suffix.size() || n.compare(n.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const std::string prefix = n.substr(0, n.size() - suffix.size());  // case/type/bN
    const size_t s2 = prefix.rfind('/'), s1 = prefix.rfind('/', s2 - 1);
    GoldenCase c;
    c.prefix = prefix;
    c.input = prefix.substr(0, s1) + "/input";
    c.type = *quant4_from_name(prefix.substr(s1 + 1, s2 - s1 - 1));
    c.block = std::stoll(prefix.substr(s2 + 2));
    out.push_back(c);
  }
  return out;
}

TEST(QuantGolden, CodesScalesAndDoubleQuantAreBitExact) {
  const auto cases = golden_cases();
  ASSERT_GE(cases.size(), 20u) << kRegen;
  for (const GoldenCase& c : cases) {
    SCOPED_TRACE(c.prefix);
    const auto x = tensor<float>(c.input);
    const auto n = int64_t(x.size());
    std::vector<uint8_t> codes(size_t(quant4_code_bytes(n)));
    std::vector<float> absmax(size_t(quant4_num_blocks(n, c.block)));
    quantize4_ref(x.data(), n, c.block, c.type, codes.data(), absmax.data());
    EXPECT_EQ(codes, tensor<uint8_t>(c.prefix + "/codes"));
    EXPECT_EQ(absmax, tensor<float>(c.prefix + "/absmax"));
    std::vector<uint8_t> codes_fast(codes.size());
    std::vector<float> absmax_fast(absmax.size());
    quantize4(x.data(), n, c.block, c.type, codes_fast.data(), absmax_fast.data());
    EXPECT_EQ(codes_fast, codes);

    const NestedAbsmax nq = double_quantize(absmax.data(), int64_t(absmax.size()));
    EXPECT_EQ(nq.codes, tensor<uint8_t>(c.prefix + "/dq_codes"));
    EXPECT_EQ(nq.nested_absmax, tensor<float>(c.prefix + "/dq_nested_absmax"));
    EXPECT_EQ(std::vector<float>{nq.offset}, tensor<float>(c.prefix + "/dq_offset"));

    if (golden().find(c.prefix + "/dequant")) {
      std::vector<float> y(static_cast<size_t>(n));
      dequantize4(codes.data(), absmax.data(), n, c.block, c.type, y.data());
      EXPECT_EQ(y, tensor<float>(c.prefix + "/dequant"));
    }
  }
}

}  // namespace
}  // namespace qlora

namespace qlora {
namespace {

// The packed quant state is byte for byte what bitsandbytes' json.dumps writes.
TEST(QuantGolden, QuantStateJsonMatchesPython) {
  for (const GoldenCase& c : golden_cases()) {
    SCOPED_TRACE(c.prefix);
    const auto x = tensor<float>(c.input);
    const Quant4Tensor q = quantize_tensor(x.data(), {int64_t(x.size())}, c.type, c.block, true);
    const auto nested = tensor<uint8_t>(c.prefix + "/state_json_nested");
    EXPECT_EQ(bnb_quant_state_json(q, DType::F32), std::string(nested.begin(), nested.end()));
    const Quant4Tensor plain = quantize_tensor(x.data(), {int64_t(x.size())}, c.type, c.block, false);
    const auto p = tensor<uint8_t>(c.prefix + "/state_json_plain");
    EXPECT_EQ(bnb_quant_state_json(plain, DType::F32), std::string(p.begin(), p.end()));
  }
}

}  // namespace
}  // namespace qlora
