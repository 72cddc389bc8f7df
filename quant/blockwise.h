// Blockwise 4-bit quantization (NF4/FP4) with optional double quantization of
// the per-block absmax scales, in the bitsandbytes format.
//
// n values, flattened row-major, are cut into blocks of `block` values (the
// last block may be short). Per block: absmax = max |x| (fp32); every value
// becomes the nearest 4-bit code of x * (1/absmax) (quant/codebook.h); codes
// are packed two per byte, first in the high nibble: (n+1)/2 bytes.
//
// Double quantization (QLoRA section 3): the fp32 absmax vector is shifted by
// its mean (offset) and quantized again, blockwise with block 256, to 8 bits of
// the signed dynamic map (quant/dynamic_map.h), leaving one fp32 scale per 256
// blocks. Storage at block 64: 4 + 8/64 + 32/(64*256) = 4.127 bits/parameter.
//
// Every function has a scalar `_ref` twin: the readable definition the fast
// (OpenMP) version is tested against bit for bit.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "quant/codebook.h"

namespace qlora {

inline constexpr int64_t kDefaultBlock4 = 64;
inline constexpr int64_t kNestedBlock = 256;

std::string_view quant4_name(Quant4Type t);  // "nf4" | "fp4"
std::optional<Quant4Type> quant4_from_name(std::string_view s);
// 32, 64, 128, ..., 4096: the block sizes bitsandbytes accepts.
bool valid_block4(int64_t block);

inline int64_t quant4_num_blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }
inline int64_t quant4_code_bytes(int64_t n) { return (n + 1) / 2; }

// codes: quant4_code_bytes(n) bytes; absmax: quant4_num_blocks(n, block) floats.
void quantize4_ref(const float* x, int64_t n, int64_t block, Quant4Type t, uint8_t* codes, float* absmax);
void quantize4(const float* x, int64_t n, int64_t block, Quant4Type t, uint8_t* codes, float* absmax);
// out: n floats = code value * absmax of its block (fp32, as bitsandbytes
// computes before casting to the weight dtype).
void dequantize4_ref(const uint8_t* codes, const float* absmax, int64_t n, int64_t block, Quant4Type t,
                     float* out);
void dequantize4(const uint8_t* codes, const float* absmax, int64_t n, int64_t block, Quant4Type t,
                 float* out);

// 8-bit blockwise quantization against a 256-entry code book (bitsandbytes'
// quantize_blockwise): q = nearest code of x * (1/absmax_block).
void quantize8_ref(const float* x, int64_t n, int64_t block, const float* code, uint8_t* q, float* absmax);
void dequantize8_ref(const uint8_t* q, const float* absmax, int64_t n, int64_t block, const float* code,
                     float* out);

// The double-quantized form of an absmax vector.
struct NestedAbsmax {
  std::vector<uint8_t> codes;         // one per 4-bit block
  std::vector<float> nested_absmax;   // one per kNestedBlock codes
  float offset = 0.0f;                // mean of the original absmax values
  int64_t nested_block = kNestedBlock;
  // The 8-bit code book the codes index: empty = dynamic_map_signed(). A
  // checkpoint written elsewhere carries its own (nested_quant_map), which may
  // differ from ours in the last bit (see quant/dynamic_map.cpp).
  std::vector<float> code8;
};
// offset = mean of absmax, accumulated in double and rounded to fp32 (torch's
// fp32 mean may differ in the last bit; the offset is stored, so files stay
// self-describing either way).
NestedAbsmax double_quantize(const float* absmax, int64_t nblocks);
// absmax[i] = dynamic_map[codes[i]] * nested_absmax[i / 256] + offset, in fp32.
void double_dequantize(const NestedAbsmax& nq, float* absmax);

// One quantized weight: codes + scales + what is needed to undo it.
struct Quant4Tensor {
  Quant4Type type = Quant4Type::NF4;
  int64_t block = kDefaultBlock4;
  std::vector<int64_t> shape;  // logical shape, e.g. [out, in]
  std::vector<uint8_t> codes;
  std::vector<float> absmax;            // filled when not double-quantized
  std::optional<NestedAbsmax> nested;   // filled when double-quantized
  int64_t numel() const;
  // The fp32 absmax per block, undoing double quantization when present.
  std::vector<float> block_scales() const;
};

Quant4Tensor quantize_tensor(const float* x, std::vector<int64_t> shape, Quant4Type t, int64_t block,
                             bool double_quant);
void dequantize_tensor(const Quant4Tensor& q, float* out);

}  // namespace qlora
