// The tensors of a Llama-family checkpoint, described as data: one table per
// architecture maps each tensor kind to its Hugging Face name and shape. The
// loader, the quantizer and `qlora inspect` all check files against it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "io/hf_config.h"
#include "io/safetensors.h"

namespace qlora {

enum class TensorKind {
  Embed,        // model.embed_tokens.weight               [V, C]
  AttnNorm,     // model.layers.{i}.input_layernorm.weight [C]
  Q, K, V, O,   // model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
  QBias, KBias, VBias,  // ...{q,k,v}_proj.bias (qwen2, attention_bias)
  OBias,        // o_proj.bias (llama, qwen3 with attention_bias)
  QNorm, KNorm, // model.layers.{i}.self_attn.{q,k}_norm.weight [D] (qwen3)
  MlpNorm,      // model.layers.{i}.post_attention_layernorm.weight [C]
  Gate, Up, Down,        // model.layers.{i}.mlp.{gate,up,down}_proj.weight
  GateBias, UpBias, DownBias,  // mlp_bias
  FinalNorm,    // model.norm.weight [C]
  LmHead,       // lm_head.weight [V, C]; absent when tie_word_embeddings
};
std::string_view tensor_kind_name(TensorKind k);

struct TensorSlot {
  std::string name;   // full HF name
  TensorKind kind;
  int64_t layer;      // -1 for tensors outside the blocks
  Shape shape;        // logical shape (rows = out features for linears)
  bool is_block_linear;  // q,k,v,o,gate,up,down weights: the ones QLoRA quantizes
};

// Every tensor a checkpoint of this config must hold, in model order.
std::vector<TensorSlot> expected_tensors(const ModelConfig& cfg);

// HF names that may appear in a checkpoint and are ignored (e.g. the
// rotary_emb.inv_freq buffers older transformers versions saved).
bool is_ignorable_tensor(std::string_view name);

struct PresentTensor {
  std::string name;
  Shape shape;  // logical shape (for 4-bit tensors: the shape from their quant state)
};

struct TensorCheck {
  std::vector<std::string> missing;
  std::vector<std::string> unexpected;
  struct WrongShape {
    std::string name;
    Shape expected, actual;
  };
  std::vector<WrongShape> wrong_shape;
  // Parallel to `missing` (filled by check_tensors): the expected shape as
  // "[I, C] = [11008, 4096]", for report(). May be left empty.
  std::vector<std::string> missing_expected;
  bool ok() const { return missing.empty() && unexpected.empty() && wrong_shape.empty(); }
  // Multi-line human report listing every problem by name (at most `limit` per category).
  std::string report(size_t limit = 20) const;
};

TensorCheck check_tensors(const std::vector<TensorSlot>& expected, const std::vector<PresentTensor>& present);

}  // namespace qlora
