// Blockwise 4-bit quantization and double quantization: the fast paths equal
// the scalar references bit for bit; special blocks; error bounds derived from
// the code books' gaps.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "testing.h"
#include "core/dtype.h"
#include "quant/blockwise.h"
#include "quant/dynamic_map.h"

namespace qlora {
namespace {

// Half the widest gap between neighbouring code values: the worst rounding
// error of a value scaled into [-1, 1].
double max_half_gap(Quant4Type t) {
  std::vector<float> v;
  for (int c = 0; c < 16; ++c) v.push_back(quant4_code_value(t, uint8_t(c)));
  std::sort(v.begin(), v.end());
  double g = 0;
  for (size_t i = 1; i < v.size(); ++i) g = std::max(g, double(v[i]) - v[i - 1]);
  return g / 2;
}

struct Case {
  Quant4Type type;
  int64_t block;
  int64_t n;
};

std::vector<Case> cases() {
  std::vector<Case> c;
  for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4})
    for (int64_t b = 32; b <= 4096; b *= 2)
      for (int64_t n : {int64_t(1), int64_t(31), int64_t(b - 1), int64_t(b), int64_t(3 * b + 7), int64_t(200003)})
        c.push_back({t, b, n});
  return c;
}

TEST(QuantBlockwise, FastPathEqualsReferenceBitForBit) {
  for (const Case& c : cases()) {
    const auto x = testing::randn(c.n, unsigned(c.n + c.block), 0.02f);
    std::vector<uint8_t> c_ref(size_t(quant4_code_bytes(c.n))), c_fast(c_ref.size());
    std::vector<float> a_ref(size_t(quant4_num_blocks(c.n, c.block))), a_fast(a_ref.size());
    quantize4_ref(x.data(), c.n, c.block, c.type, c_ref.data(), a_ref.data());
    quantize4(x.data(), c.n, c.block, c.type, c_fast.data(), a_fast.data());
    ASSERT_EQ(c_ref, c_fast) << quant4_name(c.type) << " block " << c.block << " n " << c.n;
    ASSERT_EQ(a_ref, a_fast);
    std::vector<float> d_ref(size_t(c.n)), d_fast(size_t(c.n));
    dequantize4_ref(c_ref.data(), a_ref.data(), c.n, c.block, c.type, d_ref.data());
    dequantize4(c_ref.data(), a_ref.data(), c.n, c.block, c.type, d_fast.data());
    ASSERT_EQ(d_ref, d_fast);
  }
}

// NaN, infinities, -0, subnormals and all-zero blocks take the same path
// through the counting fast path as through the reference tree.
TEST(QuantBlockwise, FastPathEqualsReferenceOnSpecialValues) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> x = testing::randn(64 * 8 + 3, 5, 1.0f);
  x[3] = nan;                                              // block 0: one NaN
  x[64 + 5] = inf;                                         // block 1: +inf absmax
  x[128 + 7] = -inf;                                       // block 2: -inf
  for (int i = 192; i < 256; ++i) x[size_t(i)] = 0.0f;     // block 3: all zero
  for (int i = 256; i < 320; ++i) x[size_t(i)] = -0.0f;    // block 4: all -0
  for (int i = 320; i < 384; ++i) x[size_t(i)] = 1e-40f;   // block 5: subnormal
  for (int i = 384; i < 448; ++i) x[size_t(i)] = nan;      // block 6: all NaN
  const auto n = int64_t(x.size());
  for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4}) {
    std::vector<uint8_t> c_ref(size_t(quant4_code_bytes(n))), c_fast(c_ref.size());
    std::vector<float> a_ref(size_t(quant4_num_blocks(n, 64))), a_fast(a_ref.size());
    quantize4_ref(x.data(), n, 64, t, c_ref.data(), a_ref.data());
    quantize4(x.data(), n, 64, t, c_fast.data(), a_fast.data());
    EXPECT_EQ(c_ref, c_fast) << quant4_name(t);
    for (size_t b = 0; b < a_ref.size(); ++b)
      EXPECT_EQ(f32_bits(a_ref[b]), f32_bits(a_fast[b])) << quant4_name(t) << " block " << b;
  }
}

TEST(QuantBlockwise, RoundTripErrorWithinHalfTheWidestGap) {
  for (const Case& c : cases()) {
    const auto x = testing::randn(c.n, 11, 1.0f);
    const Quant4Tensor q = quantize_tensor(x.data(), {c.n}, c.type, c.block, false);
    std::vector<float> y(size_t(c.n));
    dequantize_tensor(q, y.data());
    const double bound = max_half_gap(c.type);
    for (int64_t i = 0; i < c.n; ++i) {
      const double amax = q.absmax[size_t(i / c.block)];
      // fp32 scaling and product add a few ulps of absmax.
      ASSERT_LE(std::fabs(double(x[size_t(i)]) - y[size_t(i)]), bound * amax + 4e-7 * amax)
          << quant4_name(c.type) << " block " << c.block << " i " << i;
    }
  }
}

TEST(QuantBlockwise, AllZeroBlockEncodesCodeZeroAndDecodesToZero) {
  std::vector<float> x(128, 0.0f);
  for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4}) {
    std::vector<uint8_t> codes(64);
    std::vector<float> absmax(2), y(128, 1.0f);
    quantize4_ref(x.data(), 128, 64, t, codes.data(), absmax.data());
    EXPECT_EQ(absmax[0], 0.0f);
    for (uint8_t b : codes) EXPECT_EQ(b, 0x00) << "bitsandbytes: 0 * (1/0) is NaN -> code 0";
    dequantize4_ref(codes.data(), absmax.data(), 128, 64, t, y.data());
    for (float v : y) EXPECT_EQ(v, 0.0f);
  }
}

TEST(QuantBlockwise, ConstantBlocksAreExact) {
  for (float c : {0.75f, -3.0f, 1e-30f, 6.5e4f}) {
    std::vector<float> x(64, c), y(64);
    for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4}) {
      std::vector<uint8_t> codes(32);
      float absmax = 0;
      quantize4_ref(x.data(), 64, 64, t, codes.data(), &absmax);
      EXPECT_EQ(absmax, std::fabs(c));
      const uint8_t expect = t == Quant4Type::NF4 ? (c > 0 ? 0xff : 0x00) : (c > 0 ? 0x33 : 0xbb);
      for (uint8_t b : codes) EXPECT_EQ(b, expect) << quant4_name(t) << " c=" << c;
      dequantize4_ref(codes.data(), &absmax, 64, 64, t, y.data());
      for (float v : y) EXPECT_EQ(v, c);
    }
  }
}

TEST(QuantBlockwise, OddLengthPadsTheLastNibbleWithTheCodeOfZero) {
  const std::vector<float> x = {0.5f, -1.0f, 1.0f};
  for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4}) {
    std::vector<uint8_t> codes(2);
    float absmax = 0;
    quantize4_ref(x.data(), 3, 64, t, codes.data(), &absmax);
    EXPECT_EQ(codes[1] & 0x0f, quant4_quantize_scaled(t, 0.0f)) << quant4_name(t);
    EXPECT_EQ(codes[1] >> 4, quant4_quantize_scaled(t, 1.0f));
    EXPECT_EQ(codes[0] >> 4, quant4_quantize_scaled(t, 0.5f));
  }
}

TEST(QuantBlockwise, RejectsBlockSizesBitsandbytesDoesNot) {
  std::vector<float> x(256, 1.0f);
  std::vector<uint8_t> codes(128);
  std::vector<float> absmax(16);
  for (int64_t b : {0, 16, 48, 8192}) {
    EXPECT_FALSE(valid_block4(b));
    EXPECT_THROW(quantize4(x.data(), 256, b, Quant4Type::NF4, codes.data(), absmax.data()), std::exception);
  }
}

TEST(QuantBlockwise, DoubleQuantErrorWithinHalfTheWidestMapGap) {
  const auto& m = dynamic_map_signed();
  double gap = 0;
  for (size_t i = 1; i < 256; ++i) gap = std::max(gap, double(m[i]) - m[i - 1]);
  // absmax values of real weights: positive, spread over a decade.
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(0.01f, 0.1f);
  std::vector<float> absmax(1000);
  for (auto& v : absmax) v = u(rng);
  const NestedAbsmax nq = double_quantize(absmax.data(), 1000);
  ASSERT_EQ(nq.codes.size(), 1000u);
  ASSERT_EQ(nq.nested_absmax.size(), 4u);  // ceil(1000 / 256)
  double mean = 0;
  for (float v : absmax) mean += v;
  EXPECT_EQ(nq.offset, float(mean / 1000));
  std::vector<float> back(1000);
  double_dequantize(nq, back.data());
  for (size_t i = 0; i < 1000; ++i) {
    const double scale = nq.nested_absmax[i / 256];
    ASSERT_LE(std::fabs(double(absmax[i]) - back[i]), gap / 2 * scale + 1e-7) << i;
  }
}

TEST(QuantBlockwise, StorageIs4point127BitsPerParameterAtBlock64WithDoubleQuant) {
  const int64_t n = int64_t(4096) * 4096;
  const int64_t blocks = quant4_num_blocks(n, 64);
  const int64_t nested = (blocks + kNestedBlock - 1) / kNestedBlock;
  const double bits = double(quant4_code_bytes(n) * 8 + blocks * 8 + nested * 32) / double(n);
  EXPECT_NEAR(bits, 4.127, 0.0005);
  const double bits_plain = double(quant4_code_bytes(n) * 8 + blocks * 32) / double(n);
  EXPECT_NEAR(bits_plain, 4.5, 1e-9);
}

// NF4 is information-theoretically tuned to normal data: on Gaussian weights
// its error is lower than FP4's (QLoRA section 3 / table 2).
TEST(QuantBlockwise, Nf4BeatsFp4OnGaussianData) {
  const auto x = testing::randn(1 << 18, 99, 0.02f);
  auto rmse = [&](Quant4Type t) {
    const Quant4Tensor q = quantize_tensor(x.data(), {int64_t(x.size())}, t, 64, true);
    std::vector<float> y(x.size());
    dequantize_tensor(q, y.data());
    double s = 0;
    for (size_t i = 0; i < x.size(); ++i) s += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    return std::sqrt(s / double(x.size()));
  };
  EXPECT_LT(rmse(Quant4Type::NF4), rmse(Quant4Type::FP4));
}

}  // namespace
}  // namespace qlora
