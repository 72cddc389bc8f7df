// The 4-bit code books and 8-bit dynamic map: values, rounding at and between
// every threshold, the tie rule, nibble order. Expected values are derived
// here from the code tables (midpoints, nearest code), not copied from the
// implementation's pivots.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "quant/blockwise.h"
#include "quant/codebook.h"
#include "quant/dynamic_map.h"

namespace qlora {
namespace {

std::vector<float> sorted_values(Quant4Type t) {
  std::vector<float> v;
  for (int c = 0; c < 16; ++c) v.push_back(quant4_code_value(t, uint8_t(c)));
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());  // FP4 has +0 and -0
  return v;
}

// Index into sorted_values() of the value a code stands for.
size_t rank_of(Quant4Type t, uint8_t code) {
  const auto v = sorted_values(t);
  return size_t(std::find(v.begin(), v.end(), quant4_code_value(t, code)) - v.begin());
}

TEST(QuantCodebook, Nf4TableIsTheQloraCodeBook) {
  // 16 strictly increasing values, exactly -1, 0 and 1 among them, 7 below zero
  // and 8 above (the asymmetric construction of QLoRA section 3).
  float prev = -2.0f;
  int neg = 0, pos = 0;
  for (int c = 0; c < 16; ++c) {
    const float v = nf4_code_value(uint8_t(c));
    EXPECT_GT(v, prev) << "code " << c;
    prev = v;
    neg += v < 0;
    pos += v > 0;
  }
  EXPECT_EQ(nf4_code_value(0), -1.0f);
  EXPECT_EQ(nf4_code_value(7), 0.0f);
  EXPECT_EQ(nf4_code_value(15), 1.0f);
  EXPECT_EQ(neg, 7);
  EXPECT_EQ(pos, 8);
}

TEST(QuantCodebook, Fp4TableIsE2M1DividedBy12) {
  // Magnitudes of the 3-bit patterns: 0, 0.0625, 8, 12, 4, 6, 2, 3 (over 12).
  const double mag[8] = {0, 0.0625, 8, 12, 4, 6, 2, 3};
  for (int c = 0; c < 16; ++c) {
    const double expect = (c & 8 ? -1 : 1) * mag[c & 7] / 12.0;
    EXPECT_EQ(fp4_code_value(uint8_t(c)), static_cast<float>(expect)) << "code " << c;
  }
  EXPECT_TRUE(std::signbit(fp4_code_value(8)));  // -0
}

void expect_every_code_round_trips(Quant4Type t) {
  for (int c = 0; c < 16; ++c) {
    const float v = quant4_code_value(t, uint8_t(c));
    const uint8_t back = quant4_quantize_scaled(t, v);
    if (t == Quant4Type::FP4 && c == 8) {
      EXPECT_EQ(back, 0) << "-0 has no sign (x < 0 is false): bitsandbytes stores code 0";
    } else {
      EXPECT_EQ(back, c) << quant4_name(t) << " value " << v;
    }
  }
}

TEST(QuantCodebook, EveryCodeValueQuantizesToItself) {
  expect_every_code_round_trips(Quant4Type::NF4);
  expect_every_code_round_trips(Quant4Type::FP4);
}

// For each pair of neighbouring values: the smallest float that rounds up lies
// within one ulp of the midpoint, everything below it rounds down, and a value
// exactly at the switch point's predecessor (the pivot itself) rounds DOWN.
void expect_thresholds_at_midpoints(Quant4Type t) {
  const auto v = sorted_values(t);
  for (size_t i = 0; i + 1 < v.size(); ++i) {
    const double mid = (double(v[i]) + double(v[i + 1])) / 2.0;
    // Bisect over floats between the two code values for the first one that rounds up.
    float lo = v[i], hi = v[i + 1];
    while (std::nextafter(lo, hi) != hi) {
      const float m = lo + (hi - lo) / 2;
      const float probe = (m == lo) ? std::nextafter(lo, hi) : m;
      if (rank_of(t, quant4_quantize_scaled(t, probe)) > i) hi = probe;
      else lo = probe;
    }
    // hi: first float that rounds up; lo: last that rounds down.
    EXPECT_EQ(rank_of(t, quant4_quantize_scaled(t, lo)), i) << quant4_name(t) << " pivot " << i;
    EXPECT_EQ(rank_of(t, quant4_quantize_scaled(t, hi)), i + 1) << quant4_name(t) << " pivot " << i;
    const double ulp = std::nextafter(float(mid), 2.0f) - float(mid);
    // NF4's pivots are the fp32 midpoints (17 digits in bitsandbytes' source);
    // its FP4 pivots are written with 6 to 8 significant digits (0.583333,
    // 0.00260417), so they sit up to 1.3e-6 (relative) off the midpoint.
    const double tol = 2 * ulp + (t == Quant4Type::NF4 ? 0.0 : 1.5e-6 * std::fabs(mid));
    EXPECT_LE(std::fabs(double(lo) - mid), tol)
        << quant4_name(t) << ": threshold between " << v[i] << " and " << v[i + 1] << " is at " << lo
        << ", midpoint " << mid;
  }
}

TEST(QuantCodebook, Nf4RoundsAtMidpointsTiesDown) { expect_thresholds_at_midpoints(Quant4Type::NF4); }
TEST(QuantCodebook, Fp4RoundsAtMidpointsTiesDown) { expect_thresholds_at_midpoints(Quant4Type::FP4); }

// Between thresholds the code is the nearest one (brute force in double).
void expect_nearest_between_thresholds(Quant4Type t) {
  const auto v = sorted_values(t);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int k = 0; k < 200000; ++k) {
    const float x = u(rng);
    size_t best = 0;
    for (size_t i = 1; i < v.size(); ++i)
      if (std::fabs(double(x) - v[i]) < std::fabs(double(x) - v[best])) best = i;
    // Skip values within 1e-6 of a midpoint: there the tie rule decides (tested above).
    bool near_mid = false;
    for (size_t i = 0; i + 1 < v.size(); ++i)
      near_mid |= std::fabs(double(x) - (double(v[i]) + v[i + 1]) / 2) < 1e-6;
    if (near_mid) continue;
    ASSERT_EQ(rank_of(t, quant4_quantize_scaled(t, x)), best) << quant4_name(t) << " x=" << x;
  }
}

TEST(QuantCodebook, Nf4NearestCodeBetweenThresholds) { expect_nearest_between_thresholds(Quant4Type::NF4); }
TEST(QuantCodebook, Fp4NearestCodeBetweenThresholds) { expect_nearest_between_thresholds(Quant4Type::FP4); }

TEST(QuantCodebook, NanBecomesCodeZero) {
  // 0 * (1/0) in an all-zero block is NaN; bitsandbytes' trees send it to code 0.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(nf4_quantize_scaled(nan), 0);
  EXPECT_EQ(fp4_quantize_scaled(nan), 0);
}

TEST(QuantCodebook, FirstElementOfEachPairInHighNibble) {
  EXPECT_EQ(quant4_pack(0x1, 0xe), 0x1e);
  const uint8_t packed[2] = {0xab, 0xcd};
  EXPECT_EQ(quant4_unpack(packed, 0), 0xa);
  EXPECT_EQ(quant4_unpack(packed, 1), 0xb);
  EXPECT_EQ(quant4_unpack(packed, 2), 0xc);
  EXPECT_EQ(quant4_unpack(packed, 3), 0xd);
  // Through the quantizer: [-1, 1] in one block of 32 (absmax 1) -> codes 0 and 15.
  std::vector<float> x(32, 0.0f);
  x[0] = -1.0f;
  x[1] = 1.0f;
  std::vector<uint8_t> codes(16);
  float absmax = 0;
  quantize4_ref(x.data(), 32, 32, Quant4Type::NF4, codes.data(), &absmax);
  EXPECT_EQ(codes[0], 0x0f);
  EXPECT_EQ(codes[1], 0x77);  // zeros are code 7 in NF4
}

TEST(QuantCodebook, DynamicMapHas256SortedSymmetricValues) {
  const auto& m = dynamic_map_signed();
  for (size_t i = 1; i < 256; ++i) EXPECT_LT(m[i - 1], m[i]) << i;
  // 127 negative values mirroring the 127 positive ones below 1, then 0 and 1.
  EXPECT_EQ(m[127], 0.0f);
  EXPECT_EQ(m[255], 1.0f);
  for (size_t i = 0; i < 127; ++i) EXPECT_EQ(m[i], -m[254 - i]) << i;
  // Seven decades: the smallest magnitude is 1e-6 * 0.55 (mean of linspace(0.1, 1, 2)).
  EXPECT_FLOAT_EQ(m[128], 0.55e-6f);
  EXPECT_NEAR(m[254], 0.99296875f, 1e-7f);
}

TEST(QuantCodebook, DynamicMapRoundsToNearestCode) {
  const auto& m = dynamic_map_signed();
  for (int i = 0; i < 256; ++i) EXPECT_EQ(code8_quantize_scaled(m.data(), m[size_t(i)]), i) << i;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int k = 0; k < 100000; ++k) {
    const float x = u(rng) * (k % 2 ? 1.0f : 1e-3f);
    int best = 0;
    for (int i = 1; i < 256; ++i)
      if (std::fabs(double(x) - m[size_t(i)]) < std::fabs(double(x) - m[size_t(best)])) best = i;
    const int got = code8_quantize_scaled(m.data(), x);
    // Equal distance (a tie) may go either way; otherwise the nearest code.
    const double dg = std::fabs(double(x) - m[size_t(got)]), db = std::fabs(double(x) - m[size_t(best)]);
    ASSERT_LE(dg - db, 1e-7 * std::fabs(x) + 1e-12) << "x=" << x << " got " << got << " nearest " << best;
  }
}

}  // namespace
}  // namespace qlora
