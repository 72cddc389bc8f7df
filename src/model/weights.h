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
#include "model/lora.h"
#include "model/tensor_table.h"

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
  const float *q_norm = nullptr, *k_norm = nullptr;  // (D) each; qwen3 only
  // q (H*D,C), k and v (KVH*D,C), o (C,H*D), gate and up (I,C), down (C,I)
  ops::LinearWeight q, k, v, o, gate, up, down;
  // null when the architecture has none
  const float *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr, *o_bias = nullptr;
  const float *gate_bias = nullptr, *up_bias = nullptr, *down_bias = nullptr;
  // The linear a LoRA target adapts, and its bias (null when none).
  const ops::LinearWeight& linear(LoraTarget t) const {
    const ops::LinearWeight* w[kNumLoraTargets] = {&q, &k, &v, &o, &gate, &up, &down};
    return *w[int(t)];
  }
  const float* bias(LoraTarget t) const {
    const float* b[kNumLoraTargets] = {q_bias, k_bias, v_bias, o_bias, gate_bias, up_bias, down_bias};
    return b[int(t)];
  }
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

// Bytes of the arena load_llama_weights allocates for this config and these
// options (the same layout code in measuring mode; for a bitsandbytes
// checkpoint pass the checkpoint's type, block and double_quant). The memory
// planner's figure; random_llama_weights allocates the same.
size_t base_weight_arena_bytes(const ModelConfig& cfg, const WeightLoadOptions& opt);

// Loads an HF folder: F32/BF16/F16 safetensors (quantized on load as the
// options say) or a bitsandbytes 4-bit checkpoint. Missing or unexpected
// tensors, shapes disagreeing with config.json and NaN/Inf values throw
// qlora::Error naming the tensor and file. It is stream_llama_weights into
// the arena.
LlamaWeights load_llama_weights(const std::filesystem::path& dir, const WeightLoadOptions& opt = {});

// One expected tensor in its final form, as the arena keeps it: n fp32
// values, or the 4-bit codes with one fp32 scale per block and, when double
// quantized, the kept form those scales decode from bit for bit. The pointers
// are valid only during WeightSink::put.
struct StreamedTensor {
  size_t index = 0;                // into the expected_tensors order
  const TensorSlot* slot = nullptr;
  int64_t numel = 0;
  const float* dense = nullptr;    // numel fp32, or
  const uint8_t* codes = nullptr;  // quant4_code_bytes(numel) bytes,
  const float* scales = nullptr;   // quant4_num_blocks(numel, block) fp32;
  // double quant only (else null): one code per block, one fp32 per
  // kNestedBlock blocks, the 256-entry fp32 code book, the offset.
  const uint8_t* absmax8 = nullptr;
  const float* nested_absmax = nullptr;
  const float* code8 = nullptr;
  float offset = 0.0f;
};

// The ops::LinearWeight view of a block linear's pieces (t.slot is a linear),
// with the options in effect: what LlamaLayerWeights holds for it.
ops::LinearWeight linear_view(const StreamedTensor& t, const WeightLoadOptions& opt);

// Where stream_llama_weights delivers the tensors.
class WeightSink {
 public:
  virtual ~WeightSink() = default;
  // Once, after every check of the folder passed and before the first put:
  // the config, the options in effect (a bitsandbytes checkpoint fixes type,
  // block and double_quant) and the expected tensors in delivery order.
  virtual void begin(const ModelConfig& cfg, const WeightLoadOptions& opt, const std::vector<TensorSlot>& slots) = 0;
  virtual void put(const StreamedTensor& t) = 0;
};

// load_llama_weights tensor by tensor: the same checks (errors thrown before
// begin, except non-finite values, found as each tensor is read), then each
// expected tensor in expected_tensors order, converted, handed to the sink
// and freed before the next is read, so host memory holds one tensor at a
// time (as fp32 plus its 4-bit form).
void stream_llama_weights(const std::filesystem::path& dir, const WeightLoadOptions& opt, WeightSink& sink);

// The checks stream_llama_weights makes before reading any value (config.json,
// the tensor table against it, a bitsandbytes checkpoint's quantization
// state), with the same errors. Returns the config.
ModelConfig check_llama_weights(const std::filesystem::path& dir, const WeightLoadOptions& opt = {});

}  // namespace qlora
