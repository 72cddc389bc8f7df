// The frozen base weights of a Llama-family model, loaded into one arena.
//
// Block linears (q, k, v, o, gate, up, down) are kept 4-bit (NF4 by default)
// unless the options ask for dense fp32; embeddings, norms, biases and lm_head
// stay fp32 (QLoRA quantizes only the block linears). Double-quantized scales
// are undone once at load: the CPU reference keeps one fp32 scale per block
// (0.5 bit/parameter more than the file) so every product reads plain scales.
// Beside them the arena keeps the double-quantized form they decode to bit for
// bit (ops::LinearWeight::absmax8 ...; ~0.127 bit/parameter at block 64): the
// GPU model uploads only that form, as the memory plan counts it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

#include "core/arena.h"
#include "io/hf_config.h"
#include "kernels/ops.h"

namespace qlora {

struct WeightLoadOptions {
  // false: block linears stay dense fp32 (the exact reference for fp32
  // checkpoints; a 4-bit checkpoint is dequantized).
  bool quantize = true;
  Quant4Type type = Quant4Type::NF4;
  int64_t block = 64;
  // Quantize-on-load: double-quantize the scales (and keep that form). A
  // bitsandbytes checkpoint decides for itself: its form is kept when every
  // 4-bit tensor has nested scales of block 256 (all bitsandbytes writes).
  bool double_quant = true;
};

struct LlamaLayerWeights {
  const float* attn_norm = nullptr;  // (C)
  const float* mlp_norm = nullptr;   // (C)
  // q (H*D,C), k and v (KVH*D,C), o (C,H*D), gate and up (I,C), down (C,I)
  ops::LinearWeight q, k, v, o, gate, up, down;
  // null when the architecture has none
  const float *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr, *o_bias = nullptr;
  const float *gate_bias = nullptr, *up_bias = nullptr, *down_bias = nullptr;
};

struct LlamaWeights {
  ModelConfig cfg;
  Arena arena;
  const float* embed = nullptr;       // (V,C)
  const float* lm_head = nullptr;     // (V,C): == embed when tied
  const float* final_norm = nullptr;  // (C)
  std::vector<LlamaLayerWeights> layers;
  bool quantized = false;
};

// Frees w's tensors (the arena and every view into it), keeping w.cfg: once a
// device model holds its own copy, the host copy is dead weight (35 GiB at 70B).
void release_tensors(LlamaWeights& w);

// Bytes of the arena load_llama_weights allocates for this config and these
// options (the same layout code in measuring mode; for a bitsandbytes
// checkpoint pass the checkpoint's type, block and double_quant). The memory
// planner's figure; random_llama_weights allocates the same.
size_t base_weight_arena_bytes(const ModelConfig& cfg, const WeightLoadOptions& opt);

// Loads an HF folder: F32/BF16/F16 safetensors (quantized on load as the
// options say) or a bitsandbytes 4-bit checkpoint. Missing or unexpected
// tensors, shapes disagreeing with config.json and NaN/Inf values throw
// qlora::Error naming the tensor and file.
LlamaWeights load_llama_weights(const std::filesystem::path& dir, const WeightLoadOptions& opt = {});

}  // namespace qlora
