#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace qlora {
namespace {

constexpr DType kAll[] = {DType::F64, DType::F32,  DType::F16, DType::BF16, DType::F8_E4M3,
                          DType::F8_E5M2, DType::I64, DType::I32, DType::I16, DType::I8,
                          DType::U64, DType::U32,  DType::U16, DType::U8,   DType::BOOL};

TEST(DType, NamesRoundTrip) {
  const std::string all(dtype_all_names());
  for (DType t : kAll) {
    const auto name = dtype_name(t);
    EXPECT_EQ(dtype_from_name(name), t) << name;
    EXPECT_NE(all.find(std::string(name)), std::string::npos) << name << " missing from " << all;
  }
  // Names are exact: safetensors headers use upper case and no aliases.
  for (const char* bad : {"", "F7", "f32", "FLOAT", "F32 ", "bf16", "F8_E4M3FN", "I4"})
    EXPECT_FALSE(dtype_from_name(bad).has_value()) << bad;
}

TEST(DType, SizesAndKinds) {
  const std::vector<std::pair<DType, size_t>> sizes = {
      {DType::F64, 8}, {DType::F32, 4}, {DType::F16, 2}, {DType::BF16, 2}, {DType::F8_E4M3, 1},
      {DType::F8_E5M2, 1}, {DType::I64, 8}, {DType::I32, 4}, {DType::I16, 2}, {DType::I8, 1},
      {DType::U64, 8}, {DType::U32, 4}, {DType::U16, 2}, {DType::U8, 1}, {DType::BOOL, 1}};
  for (const auto& [t, s] : sizes) EXPECT_EQ(dtype_size(t), s) << dtype_name(t);
  for (DType t : kAll) {
    const bool expect_float = dtype_name(t)[0] == 'F' || dtype_name(t) == "BF16";
    EXPECT_EQ(dtype_is_float(t), expect_float) << dtype_name(t);
  }
}

TEST(DType, Bf16RoundsToNearestEvenAtTies) {
  struct Case { uint32_t in; uint16_t out; };
  const Case cases[] = {
      {0x3f808000u, 0x3f80},  // tie, even below: down
      {0x3f818000u, 0x3f82},  // tie, odd below: up
      {0x3f808001u, 0x3f81},  // just above the tie
      {0x3f807fffu, 0x3f80},  // just below the tie
      {0xbf808000u, 0xbf80},  // negative tie
      {0xbf818000u, 0xbf82},
      {0x3f800000u, 0x3f80},  // exact
      {0x7f7fffffu, 0x7f80},  // FLT_MAX rounds to inf
      {0x7f7f7fffu, 0x7f7f},
      {0x7f800000u, 0x7f80},  // inf
      {0xff800000u, 0xff80},  // -inf
      {0x00000000u, 0x0000},
      {0x80000000u, 0x8000},  // -0 keeps its sign
      {0x00008000u, 0x0000},  // subnormal tie rounds to even zero
      {0x00018000u, 0x0002},
  };
  for (const Case& c : cases)
    EXPECT_EQ(f32_to_bf16(f32_from_bits(c.in)), c.out) << std::hex << "0x" << c.in;
}

TEST(DType, Bf16NanStaysNan) {
  // Plain truncation would turn the signalling NaN 0x7f800001 into inf.
  for (uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu, 0xffc00000u, 0x7f80ffffu}) {
    const uint16_t h = f32_to_bf16(f32_from_bits(nan));
    EXPECT_TRUE(std::isnan(bf16_to_f32(h))) << std::hex << "0x" << nan << " -> 0x" << h;
    EXPECT_EQ(h & 0x8000u, (nan >> 16) & 0x8000u) << "sign of 0x" << std::hex << nan;
  }
}

TEST(DType, Bf16RoundTripAllPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_f32(uint16_t(h));
    EXPECT_EQ(f32_bits(f), h << 16);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(f))));
    } else {
      EXPECT_EQ(f32_to_bf16(f), h) << std::hex << h;
    }
  }
}

TEST(DType, F16KnownValues) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7c01)));
  EXPECT_TRUE(std::signbit(f16_to_f32(0x8000)));
  EXPECT_EQ(f16_to_f32(0x8000), 0.0f);
}

TEST(DType, F16RoundTripAllPatterns) {
  int failures = 0;
  for (uint32_t h = 0; h < 65536 && failures < 10; ++h) {
    const float f = f16_to_f32(uint16_t(h));
    const bool is_nan = ((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff) != 0;
    if (is_nan) {
      if (!std::isnan(f) || !std::isnan(f16_to_f32(f32_to_f16(f)))) {
        ADD_FAILURE() << "NaN pattern 0x" << std::hex << h << " lost its NaN-ness";
        ++failures;
      }
    } else if (f32_to_f16(f) != h) {
      ADD_FAILURE() << "0x" << std::hex << h << " -> " << f << " -> 0x" << f32_to_f16(f);
      ++failures;
    }
  }
}

TEST(DType, F16FromF32Rounding) {
  const float inf = std::numeric_limits<float>::infinity();
  struct Case { float in; uint16_t out; };
  const Case cases[] = {
      {1.0f + std::ldexp(1.0f, -11), 0x3c00},        // tie, even below: down
      {1.0f + 3 * std::ldexp(1.0f, -11), 0x3c02},    // tie, odd below: up
      {1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20), 0x3c01},
      {-(1.0f + 3 * std::ldexp(1.0f, -11)), 0xbc02},
      {65504.0f, 0x7bff},                            // max half
      {65519.0f, 0x7bff},
      {65520.0f, 0x7c00},                            // halfway to 65536: ties to even = inf
      {1e6f, 0x7c00},
      {-1e6f, 0xfc00},
      {std::numeric_limits<float>::max(), 0x7c00},
      {inf, 0x7c00},
      {-inf, 0xfc00},
      {std::ldexp(1.0f, -14), 0x0400},               // smallest normal
      {std::ldexp(1.0f, -24), 0x0001},               // smallest subnormal
      {std::ldexp(1.0f, -25), 0x0000},               // tie with zero: even = zero
      {std::nextafter(std::ldexp(1.0f, -25), 1.0f), 0x0001},
      {3 * std::ldexp(1.0f, -25), 0x0002},           // tie between 1 and 2 ulps: even = 2
      {5 * std::ldexp(1.0f, -25), 0x0002},           // tie between 2 and 3 ulps: even = 2
      {std::ldexp(1.0f, -26), 0x0000},
      {-std::ldexp(1.0f, -24), 0x8001},
      {-std::ldexp(1.0f, -26), 0x8000},              // underflow keeps the sign
      {std::ldexp(1023.0f, -24), 0x03ff},            // largest subnormal
      {std::ldexp(1023.5f, -24), 0x0400},            // tie, rounds up into the normals
      {std::ldexp(1.0f, -149), 0x0000},              // f32 subnormal
      {0.0f, 0x0000},
      {-0.0f, 0x8000},
  };
  for (const Case& c : cases)
    EXPECT_EQ(f32_to_f16(c.in), c.out) << c.in << " (0x" << std::hex << f32_bits(c.in) << ")";
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f32_from_bits(0x7f800001u)))));
}

// Checks f32_to_f16 against an independent rounding done in double: the value
// divided by the half-precision spacing of its binade is rounded with RNE.
TEST(DType, F16FromF32MatchesReferenceOnRandomInputs) {
  std::mt19937 rng(7);
  int failures = 0;
  for (int i = 0; i < 400000 && failures < 10; ++i) {
    // Bias the exponent towards the half range so most inputs are interesting.
    uint32_t b = rng();
    const uint32_t exp = 127 - 26 + rng() % 44;  // 2^-26 .. 2^17
    if (i % 4) b = (b & 0x807fffffu) | (exp << 23);
    const float f = f32_from_bits(b);
    if (std::isnan(f)) continue;
    const double a = std::fabs(double(f));
    double expect;
    if (a >= 65520.0) {
      expect = std::numeric_limits<double>::infinity();
    } else {
      int e;
      std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
      const int ulp_exp = std::max(e - 11, -24);
      expect = std::ldexp(std::nearbyint(std::ldexp(a, -ulp_exp)), ulp_exp);
    }
    if (std::signbit(f)) expect = -expect;
    const uint16_t h = f32_to_f16(f);
    const double got = f16_to_f32(h);
    if (got != expect || std::signbit(got) != std::signbit(f)) {
      ADD_FAILURE() << "f32 0x" << std::hex << b << std::dec << " = " << f << ": got " << got << ", expected "
                    << expect;
      ++failures;
    }
  }
}

TEST(DType, F8E4M3Values) {
  EXPECT_EQ(f8e4m3_to_f32(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(f8e4m3_to_f32(0x80)));
  EXPECT_EQ(f8e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(f8e4m3_to_f32(0xb8), -1.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x7e), 448.0f);  // max finite: 1.75 * 2^8
  EXPECT_EQ(f8e4m3_to_f32(0xfe), -448.0f);
  EXPECT_EQ(f8e4m3_to_f32(0x78), 256.0f);  // exponent 15 is finite in E4M3FN
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0x7f)));
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0xff)));
  EXPECT_EQ(f8e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(f8e4m3_to_f32(0x07), std::ldexp(7.0f, -9));  // largest subnormal
  EXPECT_EQ(f8e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(f8e4m3_to_f32(0x3c), 1.5f);
  // Only 0x7f and 0xff are NaN, there are no infinities, and positive codes
  // are strictly increasing.
  for (int v = 0; v < 256; ++v) {
    const float f = f8e4m3_to_f32(uint8_t(v));
    EXPECT_EQ(std::isnan(f), (v & 0x7f) == 0x7f) << v;
    EXPECT_FALSE(std::isinf(f)) << v;
    if (v > 0 && v < 0x7f) {
      EXPECT_LT(f8e4m3_to_f32(uint8_t(v - 1)), f) << v;
    }
    if (v < 0x7f) {
      EXPECT_EQ(f8e4m3_to_f32(uint8_t(v | 0x80)), -f) << v;
    }
  }
}

TEST(DType, F8E5M2Values) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f8e5m2_to_f32(0x00), 0.0f);
  EXPECT_TRUE(std::signbit(f8e5m2_to_f32(0x80)));
  EXPECT_EQ(f8e5m2_to_f32(0x3c), 1.0f);
  EXPECT_EQ(f8e5m2_to_f32(0xc0), -2.0f);
  EXPECT_EQ(f8e5m2_to_f32(0x7b), 57344.0f);  // max finite: 1.75 * 2^15
  EXPECT_EQ(f8e5m2_to_f32(0x7c), inf);
  EXPECT_EQ(f8e5m2_to_f32(0xfc), -inf);
  for (uint8_t nan : {0x7d, 0x7e, 0x7f, 0xfd, 0xfe, 0xff}) EXPECT_TRUE(std::isnan(f8e5m2_to_f32(nan))) << int(nan);
  EXPECT_EQ(f8e5m2_to_f32(0x01), std::ldexp(1.0f, -16));  // smallest subnormal
  EXPECT_EQ(f8e5m2_to_f32(0x03), std::ldexp(3.0f, -16));
  EXPECT_EQ(f8e5m2_to_f32(0x04), std::ldexp(1.0f, -14));  // smallest normal
  for (int v = 1; v < 0x7c; ++v) EXPECT_LT(f8e5m2_to_f32(uint8_t(v - 1)), f8e5m2_to_f32(uint8_t(v))) << v;
}

TEST(DType, ConvertToF32) {
  const double f64[] = {1.5, -2.25, 1e300};
  const uint16_t bf16[] = {0x3f80, 0xc000};
  const uint16_t f16[] = {0x3c00, 0xc000};
  const uint8_t e4m3[] = {0x38, 0x7e};
  const uint8_t e5m2[] = {0x3c, 0x7c};
  float out[3];
  convert_to_f32(f64, DType::F64, 3, out);
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -2.25f);
  EXPECT_TRUE(std::isinf(out[2]));
  convert_to_f32(bf16, DType::BF16, 2, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  convert_to_f32(f16, DType::F16, 2, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  convert_to_f32(e4m3, DType::F8_E4M3, 2, out);
  EXPECT_EQ(out[1], 448.0f);
  convert_to_f32(e5m2, DType::F8_E5M2, 2, out);
  EXPECT_TRUE(std::isinf(out[1]));
  const int32_t ints[] = {1, 2};
  try {
    convert_to_f32(ints, DType::I32, 2, out);
    FAIL() << "expected an Error for I32";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("I32"), std::string::npos) << e.what();
  }
}

TEST(DType, ConvertFromF32) {
  const float in[] = {1.0f, -2.0f, 1.0f + std::ldexp(1.0f, -11)};
  uint16_t h[3];
  convert_from_f32(in, 3, DType::F16, h);
  EXPECT_EQ(h[0], 0x3c00);
  EXPECT_EQ(h[1], 0xc000);
  EXPECT_EQ(h[2], 0x3c00);
  convert_from_f32(in, 3, DType::BF16, h);
  EXPECT_EQ(h[0], 0x3f80);
  EXPECT_EQ(h[1], 0xc000);
  float f[3];
  convert_from_f32(in, 3, DType::F32, f);
  EXPECT_EQ(f[2], in[2]);
  uint8_t b[3];
  EXPECT_THROW(convert_from_f32(in, 3, DType::I8, b), Error);
  EXPECT_THROW(convert_from_f32(in, 3, DType::F8_E4M3, b), Error);
}

// A safetensors tensor may start at an odd byte offset (after an odd-length
// U8 tensor, as in a bitsandbytes checkpoint). Reading it through a cast
// uint16_t pointer was undefined behaviour that x86 tolerates, so this test
// passes either way in the normal build and fails under UBSan without the fix
// (scripts/sanitize.sh; WeightsNested.BitsandbytesCheckpointKeepsItsOwnNestedState
// found it).
TEST(DType, ConversionsTakeUnalignedBuffers) {
  const float in[3] = {1.0f, -2.0f, 0.5f};
  alignas(8) unsigned char buf[1 + 3 * 8];
  for (DType t : {DType::BF16, DType::F16}) {
    convert_from_f32(in, 3, t, buf + 1);
    float out[3];
    convert_to_f32(buf + 1, t, 3, out);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], in[i]) << dtype_name(t);
  }
  const double d[3] = {1.0, -2.0, 0.5};
  std::memcpy(buf + 1, d, sizeof d);
  float out[3];
  convert_to_f32(buf + 1, DType::F64, 3, out);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], in[i]);
}

}  // namespace
}  // namespace qlora
