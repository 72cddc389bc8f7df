// The K-quants (256-value super-blocks). In every type the fp16 super-block
// scale(s) become fp32 first, each sub-block's d*scale (and dmin*min) is one
// fp32 product, and each value is then one multiply (and one subtract):
//   Q2_K, Q4_K, Q5_K: x = dl * q - ml        (dl = d * sc, ml = dmin * m)
//   Q3_K, Q6_K:       x = dl * q             (dl = d * signed scale; q signed)
// `_ref` walks the block in ggml's loop order; the fast kernels fill the
// per-sub-block tables first and then write each sub-block in one flat loop.
// Both perform the same fp32 operations on the same operands, so they agree
// bit for bit (a test), and with ggml's dequantize_row_* (the golden test).
#include <cstdint>

#include "core/dtype.h"
#include "quant/ggml_quants_blocks.h"
#include "quant/ggml_quants_kernels.h"

namespace qlora::ggml_kernels {

namespace {

// ---- Q2_K: 16 sub-blocks of 16, 2-bit q, a byte of (scale | min << 4) each.
// Sub-block s reads qs[32*(s/8) + 16*(s%2) + l] at bit shift 2*((s%8)/2).

void q2_K_block_ref(const BlockQ2_K& b, float* y) {
  const float d = f16_to_f32(ggml_load_u16(b.d));
  const float dmin = f16_to_f32(ggml_load_u16(b.dmin));
  const uint8_t* q = b.qs;
  int is = 0;
  for (int n = 0; n < kQK_K; n += 128) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int half = 0; half < 2; ++half) {
        const uint8_t sc = b.scales[is++];
        const float dl = d * float(sc & 0xF);
        const float ml = dmin * float(sc >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * float((q[16 * half + l] >> shift) & 3) - ml;
      }
    }
    q += 32;
  }
}

// The fast kernels take bit shifts as template arguments: SSE has no
// variable per-byte shift, and with a constant one GCC vectorizes the loop.

// Sub-blocks s and s+1: bits `shift` of q[0..15] and of q[16..31].
template <int shift>
void q2_K_pair(const uint8_t* q, const float* dl, const float* ml, float* y) {
  for (int l = 0; l < 16; ++l) y[l] = dl[0] * float((q[l] >> shift) & 3) - ml[0];
  for (int l = 0; l < 16; ++l) y[16 + l] = dl[1] * float((q[16 + l] >> shift) & 3) - ml[1];
}

void q2_K_block(const BlockQ2_K& b, float* y) {
  const float d = ggml_f16_to_f32_fast(ggml_load_u16(b.d));
  const float dmin = ggml_f16_to_f32_fast(ggml_load_u16(b.dmin));
  float dl[16], ml[16];
  for (int s = 0; s < 16; ++s) {
    dl[s] = d * float(b.scales[s] & 0xF);
    ml[s] = dmin * float(b.scales[s] >> 4);
  }
  for (int s = 0; s < 16; s += 8) {
    const uint8_t* q = b.qs + 4 * s;
    q2_K_pair<0>(q, dl + s, ml + s, y + 16 * s);
    q2_K_pair<2>(q, dl + s + 2, ml + s + 2, y + 16 * s + 32);
    q2_K_pair<4>(q, dl + s + 4, ml + s + 4, y + 16 * s + 64);
    q2_K_pair<6>(q, dl + s + 6, ml + s + 6, y + 16 * s + 96);
  }
}

// ---- Q3_K: 16 sub-blocks of 16, q = 2 low bits (laid out as Q2_K) minus 4
// unless the value's bit in hmask is set; hmask bit (s/2) of byte 16*(s%2) + l.

void q3_K_block_ref(const BlockQ3_K& b, float* y) {
  const float d_all = f16_to_f32(ggml_load_u16(b.d));
  int8_t scales[16];
  ggml_q3_k_scales(b.scales, scales);
  const uint8_t* q = b.qs;
  uint8_t m = 1;
  int is = 0;
  for (int n = 0; n < kQK_K; n += 128) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int half = 0; half < 2; ++half) {
        const float dl = d_all * float(scales[is++]);
        for (int l = 0; l < 16; ++l) {
          const int k = 16 * half + l;
          const int v = ((q[k] >> shift) & 3) - ((b.hmask[k] & m) ? 0 : 4);
          *y++ = dl * float(v);
        }
      }
      m = uint8_t(m << 1);
    }
    q += 32;
  }
}

// Sub-blocks s and s+1 (s = 2*j within a half): bits `shift` of q, hmask bit hbit.
template <int shift, int hbit>
void q3_K_pair(const uint8_t* q, const uint8_t* hm, const float* dl, float* y) {
  for (int k = 0; k < 32; ++k) {
    const int v = ((q[k] >> shift) & 3) - 4 + (((hm[k] >> hbit) & 1) << 2);
    y[k] = dl[k / 16] * float(v);
  }
}

// One half of 128 values: hmask bits h0 .. h0+3.
template <int h0>
void q3_K_half(const uint8_t* q, const uint8_t* hm, const float* dl, float* y) {
  q3_K_pair<0, h0>(q, hm, dl, y);
  q3_K_pair<2, h0 + 1>(q, hm, dl + 2, y + 32);
  q3_K_pair<4, h0 + 2>(q, hm, dl + 4, y + 64);
  q3_K_pair<6, h0 + 3>(q, hm, dl + 6, y + 96);
}

void q3_K_block(const BlockQ3_K& b, float* y) {
  const float d_all = ggml_f16_to_f32_fast(ggml_load_u16(b.d));
  int8_t scales[16];
  ggml_q3_k_scales(b.scales, scales);
  float dl[16];
  for (int s = 0; s < 16; ++s) dl[s] = d_all * float(scales[s]);
  q3_K_half<0>(b.qs, b.hmask, dl, y);
  q3_K_half<4>(b.qs + 32, b.hmask, dl + 8, y + 128);
}

// ---- Q4_K: 8 sub-blocks of 32; sub-block 2i uses the low nibbles of
// qs[32i .. 32i+31], sub-block 2i+1 the high nibbles.

void q4_K_block_ref(const BlockQ4_K& b, float* y) {
  const float d = f16_to_f32(ggml_load_u16(b.d));
  const float dmin = f16_to_f32(ggml_load_u16(b.dmin));
  const uint8_t* q = b.qs;
  for (int j = 0, is = 0; j < kQK_K; j += 64, is += 2) {
    uint8_t sc, m;
    ggml_scale_min_k4(is, b.scales, &sc, &m);
    const float d1 = d * float(sc), m1 = dmin * float(m);
    ggml_scale_min_k4(is + 1, b.scales, &sc, &m);
    const float d2 = d * float(sc), m2 = dmin * float(m);
    for (int l = 0; l < 32; ++l) *y++ = d1 * float(q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * float(q[l] >> 4) - m2;
    q += 32;
  }
}

// dl[s] = d * scale_s, ml[s] = dmin * min_s for the 8 sub-blocks of Q4_K/Q5_K.
void k4_tables(const uint8_t* scales, float d, float dmin, float* dl, float* ml) {
  for (int s = 0; s < 8; ++s) {
    uint8_t sc, m;
    ggml_scale_min_k4(s, scales, &sc, &m);
    dl[s] = d * float(sc);
    ml[s] = dmin * float(m);
  }
}

void q4_K_block(const BlockQ4_K& b, float* y) {
  float dl[8], ml[8];
  k4_tables(b.scales, ggml_f16_to_f32_fast(ggml_load_u16(b.d)), ggml_f16_to_f32_fast(ggml_load_u16(b.dmin)),
            dl, ml);
  for (int s = 0; s < 8; s += 2) {
    const uint8_t* q = b.qs + 16 * s;
    for (int l = 0; l < 32; ++l) y[32 * s + l] = dl[s] * float(q[l] & 0xF) - ml[s];
    for (int l = 0; l < 32; ++l) y[32 * s + 32 + l] = dl[s + 1] * float(q[l] >> 4) - ml[s + 1];
  }
}

// ---- Q5_K: Q4_K plus bit 4 of value l of sub-block s in bit s of qh[l].

void q5_K_block_ref(const BlockQ5_K& b, float* y) {
  const float d = f16_to_f32(ggml_load_u16(b.d));
  const float dmin = f16_to_f32(ggml_load_u16(b.dmin));
  const uint8_t* ql = b.qs;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < kQK_K; j += 64, is += 2) {
    uint8_t sc, m;
    ggml_scale_min_k4(is, b.scales, &sc, &m);
    const float d1 = d * float(sc), m1 = dmin * float(m);
    ggml_scale_min_k4(is + 1, b.scales, &sc, &m);
    const float d2 = d * float(sc), m2 = dmin * float(m);
    for (int l = 0; l < 32; ++l) *y++ = d1 * float((ql[l] & 0xF) + ((b.qh[l] & u1) ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * float((ql[l] >> 4) + ((b.qh[l] & u2) ? 16 : 0)) - m2;
    ql += 32;
    u1 = uint8_t(u1 << 2);
    u2 = uint8_t(u2 << 2);
  }
}

// Sub-blocks s and s+1: low then high nibbles of q, bits s and s+1 of qh.
template <int s>
void q5_K_pair(const uint8_t* q, const uint8_t* qh, const float* dl, const float* ml, float* y) {
  for (int l = 0; l < 32; ++l) y[l] = dl[0] * float((q[l] & 0xF) | (((qh[l] >> s) & 1) << 4)) - ml[0];
  for (int l = 0; l < 32; ++l)
    y[32 + l] = dl[1] * float((q[l] >> 4) | (((qh[l] >> (s + 1)) & 1) << 4)) - ml[1];
}

void q5_K_block(const BlockQ5_K& b, float* y) {
  float dl[8], ml[8];
  k4_tables(b.scales, ggml_f16_to_f32_fast(ggml_load_u16(b.d)), ggml_f16_to_f32_fast(ggml_load_u16(b.dmin)),
            dl, ml);
  q5_K_pair<0>(b.qs, b.qh, dl, ml, y);
  q5_K_pair<2>(b.qs + 32, b.qh, dl + 2, ml + 2, y + 64);
  q5_K_pair<4>(b.qs + 64, b.qh, dl + 4, ml + 4, y + 128);
  q5_K_pair<6>(b.qs + 96, b.qh, dl + 6, ml + 6, y + 192);
}

// ---- Q6_K: two halves of 128; in half h, value 32*c + l (c = 0..3, l = 0..31)
// takes its low 4 bits from ql[64h + 32*(c%2) + l] (low nibble for c < 2),
// its high 2 bits from bits 2c of qh[32h + l], and int8 scale 8h + 2c + l/16.

void q6_K_block_ref(const BlockQ6_K& b, float* y) {
  const float d = f16_to_f32(ggml_load_u16(b.d));
  const uint8_t* ql = b.ql;
  const uint8_t* qh = b.qh;
  const int8_t* sc = b.scales;
  for (int n = 0; n < kQK_K; n += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      // d * sc * q, left to right as ggml writes it: (d * sc) rounds first.
      y[l] = d * float(sc[is]) * float(q1);
      y[l + 32] = d * float(sc[is + 2]) * float(q2);
      y[l + 64] = d * float(sc[is + 4]) * float(q3);
      y[l + 96] = d * float(sc[is + 6]) * float(q4);
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

// 32 values c of a half (sub-blocks 2c, 2c+1): bits lshift.. of ql, hshift.. of qh.
template <int lshift, int hshift>
void q6_K_chunk(const uint8_t* ql, const uint8_t* qh, const float* dl, float* y) {
  for (int l = 0; l < 32; ++l) {
    const int q = (((ql[l] >> lshift) & 0xF) | (((qh[l] >> hshift) & 3) << 4)) - 32;
    y[l] = dl[l / 16] * float(q);
  }
}

void q6_K_block(const BlockQ6_K& b, float* y) {
  const float d = ggml_f16_to_f32_fast(ggml_load_u16(b.d));
  float dl[16];
  for (int s = 0; s < 16; ++s) dl[s] = d * float(b.scales[s]);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b.ql + 64 * h;
    const uint8_t* qh = b.qh + 32 * h;
    float* yh = y + 128 * h;
    const float* d8 = dl + 8 * h;
    q6_K_chunk<0, 0>(ql, qh, d8, yh);
    q6_K_chunk<0, 2>(ql + 32, qh, d8 + 2, yh + 32);
    q6_K_chunk<4, 4>(ql, qh, d8 + 4, yh + 64);
    q6_K_chunk<4, 6>(ql + 32, qh, d8 + 6, yh + 96);
  }
}

}  // namespace

void q2_K_ref(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ2_K, kQK_K, q2_K_block_ref>(src, nblocks, dst);
}
void q2_K(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ2_K, kQK_K, q2_K_block>(src, nblocks, dst);
}
void q3_K_ref(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ3_K, kQK_K, q3_K_block_ref>(src, nblocks, dst);
}
void q3_K(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ3_K, kQK_K, q3_K_block>(src, nblocks, dst);
}
void q4_K_ref(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ4_K, kQK_K, q4_K_block_ref>(src, nblocks, dst);
}
void q4_K(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ4_K, kQK_K, q4_K_block>(src, nblocks, dst);
}
void q5_K_ref(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ5_K, kQK_K, q5_K_block_ref>(src, nblocks, dst);
}
void q5_K(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ5_K, kQK_K, q5_K_block>(src, nblocks, dst);
}
void q6_K_ref(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ6_K, kQK_K, q6_K_block_ref>(src, nblocks, dst);
}
void q6_K(const uint8_t* src, int64_t nblocks, float* dst) {
  each_block<BlockQ6_K, kQK_K, q6_K_block>(src, nblocks, dst);
}

}  // namespace qlora::ggml_kernels
