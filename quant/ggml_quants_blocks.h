// Block layouts of the ggml (llama.cpp) types qlora dequantizes, byte for
// byte as ggml-common.h lays them out, and the small decoding helpers the
// scalar and fast paths share. Every member is a byte array (alignment 1), so
// a block may be read at any address of an mmap'd file; the fp16 fields are
// little-endian, as GGUF stores them. C++17, so device code may include it.
//
// Q = values per block; d, m, dmin are fp16; "6-bit scales" are the packed
// 12-byte scale/min table of Q4_K and Q5_K (ggml_scale_min_k4).
#pragma once

#include <cstdint>
#include <cstring>

namespace qlora {

inline constexpr int kQK_Legacy = 32;  // Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
inline constexpr int kQK_K = 256;      // the K-quants: 16 sub-blocks of 16 or 8 of 32

// x = d * (q - 8), q = 4 bits; values 0..15 in the low nibbles, 16..31 in the high.
struct BlockQ4_0 {
  uint8_t d[2];
  uint8_t qs[kQK_Legacy / 2];
};
// x = d * q + m, q = 4 bits, nibbles as Q4_0.
struct BlockQ4_1 {
  uint8_t d[2];
  uint8_t m[2];
  uint8_t qs[kQK_Legacy / 2];
};
// x = d * (q - 16), q = 5 bits: nibbles as Q4_0, bit 4 of value j is bit j of
// the little-endian uint32 qh.
struct BlockQ5_0 {
  uint8_t d[2];
  uint8_t qh[4];
  uint8_t qs[kQK_Legacy / 2];
};
// x = d * q + m, q = 5 bits laid out as Q5_0.
struct BlockQ5_1 {
  uint8_t d[2];
  uint8_t m[2];
  uint8_t qh[4];
  uint8_t qs[kQK_Legacy / 2];
};
// x = d * q, q = int8.
struct BlockQ8_0 {
  uint8_t d[2];
  int8_t qs[kQK_Legacy];
};

// 16 sub-blocks of 16: x = (d * (sc & 15)) * q - (dmin * (sc >> 4)), q = 2 bits.
struct BlockQ2_K {
  uint8_t scales[kQK_K / 16];
  uint8_t qs[kQK_K / 4];
  uint8_t d[2];
  uint8_t dmin[2];
};
// 16 sub-blocks of 16: x = (d * (s - 32)) * (q - (hbit ? 0 : 4)), q = 2 low
// bits in qs, the high bit in hmask; s = 6-bit scales packed in 12 bytes.
struct BlockQ3_K {
  uint8_t hmask[kQK_K / 8];
  uint8_t qs[kQK_K / 4];
  uint8_t scales[12];
  uint8_t d[2];
};
// 8 sub-blocks of 32: x = (d * sc) * q - (dmin * m), q = 4 bits, (sc, m) 6 bits each.
struct BlockQ4_K {
  uint8_t d[2];
  uint8_t dmin[2];
  uint8_t scales[12];
  uint8_t qs[kQK_K / 2];
};
// As Q4_K with a fifth bit per value in qh.
struct BlockQ5_K {
  uint8_t d[2];
  uint8_t dmin[2];
  uint8_t scales[12];
  uint8_t qh[kQK_K / 8];
  uint8_t qs[kQK_K / 2];
};
// 16 sub-blocks of 16: x = (d * sc) * (q - 32), q = 6 bits (4 in ql, 2 in qh), sc int8.
struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];
  uint8_t qh[kQK_K / 4];
  int8_t scales[kQK_K / 16];
  uint8_t d[2];
};

// The sizes ggml-common.h asserts (and quant/ggml_types.cpp lists; a test
// checks the two agree).
static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ2_K) == 84);
static_assert(sizeof(BlockQ3_K) == 110);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);

inline uint16_t ggml_load_u16(const uint8_t* p) {
  return uint16_t(p[0] | (p[1] << 8));
}
inline uint32_t ggml_load_u32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

// fp16 bits -> fp32, bit-identical to core/dtype's f16_to_f32 for all 65536
// inputs (a test), but branch-light so loops over it vectorize: moving the 15
// magnitude bits up by 13 puts them in the fp32 exponent/mantissa at a bias
// of 127 instead of 15, and multiplying by 2^112 fixes the bias exactly, for
// normals and subnormals alike; Inf/NaN get the all-ones exponent, payload kept.
inline float ggml_f16_to_f32_fast(uint16_t h) {
  const uint32_t mag = uint32_t(h & 0x7fffu) << 13;
  float f;
  std::memcpy(&f, &mag, 4);
  f *= 0x1p112f;
  uint32_t scaled;
  std::memcpy(&scaled, &f, 4);
  // A mask, not a branch: GCC vectorizes a select it can see (measured: the
  // ?: form left the F16 loop scalar, "control flow in loop").
  const uint32_t special = 0u - uint32_t((h & 0x7c00u) == 0x7c00u);
  const uint32_t bits = (scaled & ~special) | ((mag | 0x70000000u) & special) | (uint32_t(h & 0x8000u) << 16);
  std::memcpy(&f, &bits, 4);
  return f;
}

// Sub-block j (0..7) of the packed 6-bit scale/min table of Q4_K and Q5_K:
// j < 4: scale = low 6 bits of byte j, min = low 6 bits of byte j+4;
// j >= 4: the low 4 bits from the nibbles of byte j+4, the high 2 bits from
// the top of bytes j-4 (scale) and j (min).
inline void ggml_scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = uint8_t((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = uint8_t((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// The 16 signed 6-bit scales of Q3_K (already minus 32): scale i has its low
// 4 bits in nibble (i % 8) of bytes 0..7 (low nibbles for i < 8, high for
// i >= 8) and its high 2 bits in bits 2*(i / 4) of byte 8 + i % 4.
inline void ggml_q3_k_scales(const uint8_t* s, int8_t* out) {
  for (int i = 0; i < 16; ++i) {
    const int low = i < 8 ? (s[i] & 0xF) : (s[i - 8] >> 4);
    const int high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    out[i] = int8_t((low | (high << 4)) - 32);
  }
}

}  // namespace qlora
