#include "quant/ggml_quants.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"
#include "quant/ggml_quants_blocks.h"
#include "quant/ggml_quants_kernels.h"

namespace qlora {

namespace {

using ggml_kernels::DequantFn;
using ggml_kernels::each_block;
using F16Fn = float (*)(uint16_t);

// ---- plain types: "blocks" of one value -----------------------------------

void f32_kernel(const uint8_t* src, int64_t n, float* dst) {
  std::memcpy(dst, src, size_t(n) * 4);
}

template <F16Fn ToF32>
void f16_kernel(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = ToF32(ggml_load_u16(src + 2 * i));
}

void bf16_kernel(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(ggml_load_u16(src + 2 * i));
}

// ---- the legacy 32-value blocks ------------------------------------------
// One loop serves both paths: the fast one differs by threads and by the
// inline fp16 conversion (ggml_f16_to_f32_fast, bit-identical). As in ggml,
// the integer code is formed first and converted to fp32, then x = q * d
// (Q4_0, Q5_0, Q8_0) or x = q * d + m (Q4_1, Q5_1): two roundings, no FMA.

template <F16Fn ToF32>
void q4_0_block(const BlockQ4_0& b, float* y) {
  const float d = ToF32(ggml_load_u16(b.d));
  for (int j = 0; j < kQK_Legacy / 2; ++j) {
    y[j] = float((b.qs[j] & 0xF) - 8) * d;
    y[j + kQK_Legacy / 2] = float((b.qs[j] >> 4) - 8) * d;
  }
}

template <F16Fn ToF32>
void q4_1_block(const BlockQ4_1& b, float* y) {
  const float d = ToF32(ggml_load_u16(b.d));
  const float m = ToF32(ggml_load_u16(b.m));
  for (int j = 0; j < kQK_Legacy / 2; ++j) {
    y[j] = float(b.qs[j] & 0xF) * d + m;
    y[j + kQK_Legacy / 2] = float(b.qs[j] >> 4) * d + m;
  }
}

// Bit 4 of value j (0..31) is bit j of qh.
template <F16Fn ToF32>
void q5_0_block(const BlockQ5_0& b, float* y) {
  const float d = ToF32(ggml_load_u16(b.d));
  const uint32_t qh = ggml_load_u32(b.qh);
  for (int j = 0; j < kQK_Legacy / 2; ++j) {
    const int h0 = int((qh >> j) & 1u) << 4;
    const int h1 = int((qh >> (j + 16)) & 1u) << 4;
    y[j] = float(((b.qs[j] & 0xF) | h0) - 16) * d;
    y[j + kQK_Legacy / 2] = float(((b.qs[j] >> 4) | h1) - 16) * d;
  }
}

template <F16Fn ToF32>
void q5_1_block(const BlockQ5_1& b, float* y) {
  const float d = ToF32(ggml_load_u16(b.d));
  const float m = ToF32(ggml_load_u16(b.m));
  const uint32_t qh = ggml_load_u32(b.qh);
  for (int j = 0; j < kQK_Legacy / 2; ++j) {
    const int h0 = int((qh >> j) & 1u) << 4;
    const int h1 = int((qh >> (j + 16)) & 1u) << 4;
    y[j] = float((b.qs[j] & 0xF) | h0) * d + m;
    y[j + kQK_Legacy / 2] = float((b.qs[j] >> 4) | h1) * d + m;
  }
}

template <F16Fn ToF32>
void q8_0_block(const BlockQ8_0& b, float* y) {
  const float d = ToF32(ggml_load_u16(b.d));
  for (int j = 0; j < kQK_Legacy; ++j) y[j] = float(b.qs[j]) * d;
}

// ---- the dispatch table -----------------------------------------------------

struct Kernels {
  GgmlType type;
  DequantFn ref;
  DequantFn fast;
};

// A legacy type's two kernels: the same block loop with each fp16 conversion.
#define QLORA_LEGACY_KERNELS(Block, fn) \
  each_block<Block, kQK_Legacy, fn<f16_to_f32>>, each_block<Block, kQK_Legacy, fn<ggml_f16_to_f32_fast>>

// In the order ggml_dequantizable_names() lists them.
const Kernels kKernels[] = {
    {GgmlType::F32, f32_kernel, f32_kernel},
    {GgmlType::F16, f16_kernel<f16_to_f32>, f16_kernel<ggml_f16_to_f32_fast>},
    {GgmlType::BF16, bf16_kernel, bf16_kernel},
    {GgmlType::Q8_0, QLORA_LEGACY_KERNELS(BlockQ8_0, q8_0_block)},
    {GgmlType::Q4_0, QLORA_LEGACY_KERNELS(BlockQ4_0, q4_0_block)},
    {GgmlType::Q4_1, QLORA_LEGACY_KERNELS(BlockQ4_1, q4_1_block)},
    {GgmlType::Q5_0, QLORA_LEGACY_KERNELS(BlockQ5_0, q5_0_block)},
    {GgmlType::Q5_1, QLORA_LEGACY_KERNELS(BlockQ5_1, q5_1_block)},
    {GgmlType::Q2_K, ggml_kernels::q2_K_ref, ggml_kernels::q2_K},
    {GgmlType::Q3_K, ggml_kernels::q3_K_ref, ggml_kernels::q3_K},
    {GgmlType::Q4_K, ggml_kernels::q4_K_ref, ggml_kernels::q4_K},
    {GgmlType::Q5_K, ggml_kernels::q5_K_ref, ggml_kernels::q5_K},
    {GgmlType::Q6_K, ggml_kernels::q6_K_ref, ggml_kernels::q6_K},
};

#undef QLORA_LEGACY_KERNELS

const Kernels* find_kernels(GgmlType t) {
  for (const Kernels& k : kKernels)
    if (k.type == t) return &k;
  return nullptr;
}

std::string type_label(GgmlType t) {
  const auto tr = ggml_type_traits(uint32_t(t));
  return tr ? std::string(tr->name) : str("id ", uint32_t(t));
}

// The kernels of t and its block count for n values, or an error naming the type.
const Kernels& checked(GgmlType t, int64_t n, int64_t* nblocks) {
  const Kernels* k = find_kernels(t);
  if (!k)
    fail("GGUF type ", type_label(t), " cannot be dequantized; supported: ", ggml_dequantizable_names());
  const GgmlTypeTraits tr = ggml_traits(t);
  if (n < 0 || n % tr.block_values != 0)
    fail("GGUF type ", tr.name, ": ", n, " values is not a whole number of blocks of ", tr.block_values);
  *nblocks = n / tr.block_values;
  return *k;
}

// Values per OpenMP work item: enough that scheduling costs nothing, few
// enough that a 4096-wide row of a small model still splits over threads.
constexpr int64_t kChunkValues = 16384;

}  // namespace

bool ggml_can_dequantize(GgmlType t) {
  return find_kernels(t) != nullptr;
}

std::string ggml_dequantizable_names() {
  std::string s;
  for (const Kernels& k : kKernels) {
    if (!s.empty()) s += ", ";
    s += ggml_type_name(k.type);
  }
  return s;
}

void ggml_dequantize_ref(GgmlType t, const uint8_t* src, int64_t n, float* dst) {
  int64_t nblocks = 0;
  const Kernels& k = checked(t, n, &nblocks);
  k.ref(src, nblocks, dst);
}

void ggml_dequantize(GgmlType t, const uint8_t* src, int64_t n, float* dst) {
  int64_t nblocks = 0;
  const Kernels& k = checked(t, n, &nblocks);
  const GgmlTypeTraits tr = ggml_traits(t);
  const int64_t per_chunk = std::max<int64_t>(1, kChunkValues / tr.block_values);
  const int64_t nchunks = (nblocks + per_chunk - 1) / per_chunk;
#pragma omp parallel for schedule(static) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b0 = c * per_chunk;
    k.fast(src + b0 * tr.block_bytes, std::min(per_chunk, nblocks - b0), dst + b0 * tr.block_values);
  }
}

void ggml_quantize_q8_0(const float* src, int64_t n, uint8_t* dst) {
  if (n < 0 || n % kQK_Legacy != 0)
    fail("GGUF type Q8_0: ", n, " values is not a whole number of blocks of ", kQK_Legacy);
  const int64_t nblocks = n / kQK_Legacy;
#pragma omp parallel for schedule(static) if (nblocks >= 1024)
  for (int64_t i = 0; i < nblocks; ++i) {
    const float* x = src + i * kQK_Legacy;
    auto& b = reinterpret_cast<BlockQ8_0*>(dst)[i];
    // ggml's MAX(a, b) is (a > b ? a : b), which differs from fmaxf on NaN.
    float amax = 0.0f;
    for (int j = 0; j < kQK_Legacy; ++j) {
      const float a = std::fabs(x[j]);
      amax = amax > a ? amax : a;
    }
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const uint16_t h = f32_to_f16(d);
    b.d[0] = uint8_t(h & 0xFF);
    b.d[1] = uint8_t(h >> 8);
    // roundf: halves away from zero (not nearbyint's ties-to-even).
    for (int j = 0; j < kQK_Legacy; ++j) b.qs[j] = int8_t(std::roundf(x[j] * id));
  }
}

}  // namespace qlora
