// Internal to quant/ggml_quants*.cpp: the per-type kernels behind the
// dispatch in ggml_quants.cpp. A kernel dequantizes nblocks consecutive
// blocks of its type: src = nblocks * block bytes, dst = nblocks * Q floats.
#pragma once

#include <cstdint>

namespace qlora::ggml_kernels {

using DequantFn = void (*)(const uint8_t* src, int64_t nblocks, float* dst);

// Runs a one-block function over consecutive blocks (the Block structs have
// alignment 1, so any address is valid).
template <typename Block, int QK, void (*BlockFn)(const Block&, float*)>
void each_block(const uint8_t* src, int64_t nblocks, float* dst) {
  const auto* b = reinterpret_cast<const Block*>(src);
  for (int64_t i = 0; i < nblocks; ++i) BlockFn(b[i], dst + i * QK);
}

// quant/ggml_quants_k.cpp. `_ref` follows ggml's loops (core/dtype's fp16
// conversion); the other precomputes the per-sub-block fp32 products into a
// small table and writes each sub-block in one flat loop, which vectorizes.
void q2_K_ref(const uint8_t* src, int64_t nblocks, float* dst);
void q2_K(const uint8_t* src, int64_t nblocks, float* dst);
void q3_K_ref(const uint8_t* src, int64_t nblocks, float* dst);
void q3_K(const uint8_t* src, int64_t nblocks, float* dst);
void q4_K_ref(const uint8_t* src, int64_t nblocks, float* dst);
void q4_K(const uint8_t* src, int64_t nblocks, float* dst);
void q5_K_ref(const uint8_t* src, int64_t nblocks, float* dst);
void q5_K(const uint8_t* src, int64_t nblocks, float* dst);
void q6_K_ref(const uint8_t* src, int64_t nblocks, float* dst);
void q6_K(const uint8_t* src, int64_t nblocks, float* dst);

}  // namespace qlora::ggml_kernels
