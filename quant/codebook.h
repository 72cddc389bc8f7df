// The 4-bit code books of bitsandbytes (NF4, FP4) and its nearest-code
// rounding, shared verbatim by the CPU reference and the CUDA kernels.
//
// Bit-for-bit with bitsandbytes' CUDA kernels (csrc/kernels.cu: dQuantizeNF4,
// dQuantizeFP4, the NF4/FP4 dequantization tables):
//  - a value x is scaled by the block's reciprocal absmax (x * (1/absmax), a
//    multiplication, not a division: the two differ in the last bit);
//  - NF4 rounds with a binary decision tree whose pivots are the midpoints of
//    neighbouring codes; every comparison is a strict ">", so a value exactly on
//    a pivot rounds to the LOWER code (the tie rule);
//  - FP4 encodes the sign separately (x < 0) and rounds |x| with its own tree;
//  - NaN fails every comparison and becomes code 0 in both books. In an
//    all-zero block (0 * (1/0) = NaN) that decodes to -1 * 0 = -0 (NF4) or
//    0 (FP4); a NaN weight in a normal block decodes to -absmax (NF4).
// This header is C++17 and host/device so that nvcc can include it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif

namespace qlora {

enum class Quant4Type : uint8_t { NF4 = 0, FP4 = 1 };

// NF4: quantiles of N(0,1) normalized to [-1, 1] with an exact zero
// (QLoRA paper, arXiv 2305.14314, section 3). Index = 4-bit code.
QLORA_HD float nf4_code_value(uint8_t code) {
  constexpr float kNF4[16] = {
      -1.0f,
      -0.6961928009986877f,
      -0.5250730514526367f,
      -0.39491748809814453f,
      -0.28444138169288635f,
      -0.18477343022823334f,
      -0.09105003625154495f,
      0.0f,
      0.07958029955625534f,
      0.16093020141124725f,
      0.24611230194568634f,
      0.33791524171829224f,
      0.44070982933044434f,
      0.5626170039176941f,
      0.7229568362236023f,
      1.0f,
  };
  return kNF4[code & 0x0f];
}

// FP4 (1 sign, 2 exponent, 1 mantissa bit) divided by its max 12: the 3 low
// bits index the magnitude, bit 3 is the sign.
QLORA_HD float fp4_code_value(uint8_t code) {
  constexpr float kFP4Magnitude[8] = {
      0.0f,            // 0b000 = 0
      0.005208333333f, // 0b001 = 0.0625 / 12
      0.66666667f,     // 0b010 = 8 / 12
      1.0f,            // 0b011 = 12 / 12
      0.33333333f,     // 0b100 = 4 / 12
      0.5f,            // 0b101 = 6 / 12
      0.16666667f,     // 0b110 = 2 / 12
      0.25f,           // 0b111 = 3 / 12
  };
  const float sign = (code & 0x08) ? -1.0f : 1.0f;
  return kFP4Magnitude[code & 0x07] * sign;
}

QLORA_HD float quant4_code_value(Quant4Type t, uint8_t code) {
  return t == Quant4Type::NF4 ? nf4_code_value(code) : fp4_code_value(code);
}

// The pivots of bitsandbytes' rounding trees: midpoints between neighbouring
// codes, as the float literals of its kernels. NF4 pivot i separates codes i
// and i+1; FP4 pivot i separates the i-th and (i+1)-th smallest magnitudes.
QLORA_HD float nf4_pivot(int i) {
  constexpr float kPivots[15] = {
      -0.8480964004993439f, -0.6106329262256622f,  -0.4599952697753906f, -0.33967943489551544f,
      -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
      0.1202552504837513f,  0.2035212516784668f,   0.2920137718319893f,  0.3893125355243683f,
      0.5016634166240692f,  0.6427869200706482f,   0.8614784181118011f,
  };
  return kPivots[i];
}
QLORA_HD float fp4_pivot(int i) {
  constexpr float kPivots[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f};
  return kPivots[i];
}
// FP4 magnitudes in increasing order -> their 3-bit patterns.
QLORA_HD uint8_t fp4_magnitude_bits(int rank) {
  constexpr uint8_t kBits[8] = {0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011};
  return kBits[rank];
}

// x is already scaled into [-1, 1]. A binary search over the pivots with a
// strict ">" at every step, exactly as bitsandbytes' dQuantizeNF4 tree.
QLORA_HD uint8_t nf4_quantize_scaled(float x) {
  if (x > nf4_pivot(7)) {
    if (x > nf4_pivot(11)) {
      if (x > nf4_pivot(13)) return x > nf4_pivot(14) ? 0b1111 : 0b1110;
      return x > nf4_pivot(12) ? 0b1101 : 0b1100;
    }
    if (x > nf4_pivot(9)) return x > nf4_pivot(10) ? 0b1011 : 0b1010;
    return x > nf4_pivot(8) ? 0b1001 : 0b1000;
  }
  if (x > nf4_pivot(3)) {
    if (x > nf4_pivot(5)) return x > nf4_pivot(6) ? 0b0111 : 0b0110;
    return x > nf4_pivot(4) ? 0b0101 : 0b0100;
  }
  if (x > nf4_pivot(1)) return x > nf4_pivot(2) ? 0b0011 : 0b0010;
  return x > nf4_pivot(0) ? 0b0001 : 0b0000;
}

// bitsandbytes' dQuantizeFP4: the sign from x < 0, the magnitude by its tree.
QLORA_HD uint8_t fp4_quantize_scaled(float x) {
  const uint8_t sign = x < 0 ? 0b1000 : 0b0000;
  const float a = x < 0 ? -x : x;  // fabsf; NaN stays NaN and fails every ">" below
  int rank;
  if (a > fp4_pivot(3)) {
    if (a > fp4_pivot(5)) rank = a > fp4_pivot(6) ? 7 : 6;
    else rank = a > fp4_pivot(4) ? 5 : 4;
  } else if (a > fp4_pivot(1)) {
    rank = a > fp4_pivot(2) ? 3 : 2;
  } else {
    rank = a > fp4_pivot(0) ? 1 : 0;
  }
  return uint8_t(fp4_magnitude_bits(rank) + sign);
}

QLORA_HD uint8_t quant4_quantize_scaled(Quant4Type t, float x) {
  return t == Quant4Type::NF4 ? nf4_quantize_scaled(x) : fp4_quantize_scaled(x);
}

// Nearest code of a 256-entry sorted 8-bit code book (the signed dynamic map
// used for double quantization), exactly as bitsandbytes' dQuantize<0>: a
// 7-step binary search from index 127, then a midpoint comparison in which a
// value equal to the midpoint keeps the searched pivot.
QLORA_HD uint8_t code8_quantize_scaled(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return uint8_t(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = (lower + val) * 0.5f;
  return uint8_t(x < midpoint ? lower_pivot : pivot);
}

// Blocks of 4-bit codes are packed two per byte, the first (even-index)
// element of each pair in the HIGH nibble; the flattening is row-major. An odd
// element count leaves the last low nibble as the code of 0.0 (bitsandbytes
// pads the load with zeros).
QLORA_HD uint8_t quant4_pack(uint8_t first, uint8_t second) { return uint8_t((first << 4) | (second & 0x0f)); }
QLORA_HD uint8_t quant4_unpack(const uint8_t* codes, int64_t i) {
  const uint8_t b = codes[i >> 1];
  return (i & 1) ? uint8_t(b & 0x0f) : uint8_t(b >> 4);
}

}  // namespace qlora
