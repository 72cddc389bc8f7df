// The arena layout of LlamaWeights, shared by the loader (weights.cpp) and the
// random weights (random_weights.cpp) so both produce the same arena, whose
// size base_weight_arena_bytes measures with the same code. Internal to
// src/model (and its tests); not part of the API.
//
// Per expected tensor, in expected_tensors order, each piece 64-byte aligned:
//   dense (not 4-bit):  n fp32
//   4-bit:              (n+1)/2 code bytes, one fp32 scale per block, and with
//                       double quantization the form those scales decode from:
//                       one byte per block, one fp32 per kNestedBlock blocks,
//                       the 256-entry fp32 code book (the offset is a number
//                       in LinearWeight, not arena memory).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/arena.h"
#include "model/tensor_table.h"
#include "model/weights.h"
#include "quant/blockwise.h"

namespace qlora::weights_detail {

// Where one expected tensor lives in the arena (null: the piece is absent).
struct PlacedTensor {
  float* dense = nullptr;          // n fp32, or
  uint8_t* codes = nullptr;        // 4-bit codes
  float* scales = nullptr;         // fp32 per block: what the CPU ops read
  uint8_t* absmax8 = nullptr;      // double quant: one code per block,
  float* nested_absmax = nullptr;  // one fp32 per kNestedBlock blocks,
  float* code8 = nullptr;          // 256 fp32;
  float offset = 0.0f;             // set by store_nested_scales
};

bool keeps_4bit(const TensorSlot& s, const WeightLoadOptions& opt);

// Measuring arena: sizes only (all pointers null). Real arena: the views.
std::vector<PlacedTensor> layout_weights(Arena& a, const std::vector<TensorSlot>& slots,
                                         const WeightLoadOptions& opt);

// Throws unless nq (nested_block kNestedBlock, its codes nblocks) fits the layout.
void check_nested_scales(int64_t nblocks, const NestedAbsmax& nq, const std::string& name);

// Keeps nq (its nested_block must be kNestedBlock and its codes p's block
// count) in p's double-quant pieces, and p.scales = double_dequantize(nq), so
// the fp32 scales are bit for bit the decoded kept form. `name` is for errors.
void store_nested_scales(PlacedTensor& p, int64_t nblocks, const NestedAbsmax& nq, const std::string& name);

// Points w.embed, w.lm_head, w.final_norm and every layer's norms, linears and
// biases at the placed tensors (w.cfg must be set; tied lm_head = embed).
void bind_weights(LlamaWeights& w, const std::vector<TensorSlot>& slots,
                  const std::vector<PlacedTensor>& placed, const WeightLoadOptions& opt);

// random_llama_weights on exactly `threads` threads (>= 1): the bytes do not
// depend on it (tests check that; the public function uses every hardware thread).
LlamaWeights random_llama_weights_on(int threads, const ModelConfig& cfg, const WeightLoadOptions& opt,
                                     uint64_t seed, float init_std);

}  // namespace qlora::weights_detail
