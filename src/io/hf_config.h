// Hugging Face config.json -> a typed model configuration for the Llama family
// (llama, mistral, qwen2, qwen3). Every field a later stage needs is resolved here,
// with the defaults transformers applies when a key is absent.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

enum class Arch { Llama, Mistral, Qwen2, Qwen3 };
std::string_view arch_name(Arch a);  // "llama", "mistral", "qwen2", "qwen3"

enum class RopeScalingType { None, Linear, Llama3 };
std::string_view rope_scaling_name(RopeScalingType t);  // "none", "linear", "llama3"

struct RopeScaling {
  RopeScalingType type = RopeScalingType::None;
  double factor = 1.0;
  // llama3 only
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// bitsandbytes 4-bit settings as written in config.json's quantization_config.
struct BnbQuantConfig {
  std::string quant_type = "nf4";  // "nf4" | "fp4"
  bool double_quant = true;        // bnb_4bit_use_double_quant
  std::string compute_dtype = "bfloat16";
  std::string quant_storage = "uint8";
  std::vector<std::string> skip_modules;  // llm_int8_skip_modules
};

struct ModelConfig {
  Arch arch = Arch::Llama;
  std::string model_type;  // as written
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // defaults to num_attention_heads (no GQA)
  int64_t head_dim = 0;             // defaults to hidden_size / num_attention_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // qwen2: always true (q, k, v biases)
  bool mlp_bias = false;
  // qwen3: RMSNorm of each query and key head (weight (D), eps rms_norm_eps)
  // after the q/k projections, before RoPE.
  bool qk_norm = false;
  // Sliding-window attention: a query at t sees the keys s of its document
  // with t - s < sliding_window (its own included; transformers'
  // sliding_window_overlay). Mistral: every layer. Qwen2/Qwen3 only with
  // use_sliding_window, in the layers config.json's layer_types marks
  // "sliding_attention" (by default those with index >= max_window_layers);
  // a config in which no layer slides has no window here.
  std::optional<int64_t> sliding_window;
  std::vector<bool> sliding_layers;  // per layer; empty: every layer slides (when sliding_window is set)
  std::string torch_dtype = "bfloat16";
  std::vector<int64_t> bos_token_ids;
  std::vector<int64_t> eos_token_ids;
  std::optional<BnbQuantConfig> quantization;  // present for bnb 4-bit checkpoints

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  // The window of layer l's attention, 0 for full causal attention.
  int64_t attention_window(int64_t layer) const {
    if (!sliding_window) return 0;
    if (!sliding_layers.empty() && !sliding_layers.at(size_t(layer))) return 0;
    return *sliding_window;
  }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
};

// Parses a config.json object. `source` names the file in error messages.
// Unknown model_type -> error listing the supported ones; missing or mistyped
// required keys and inconsistent values (heads not dividing, GQA groups not
// whole, non-positive sizes) -> error naming the key and what was expected.
ModelConfig parse_model_config(const nlohmann::json& j, std::string_view source);
// Reads <dir>/config.json (or the file itself when given a file; a GGUF
// file gives the configuration its metadata describes, io/gguf_config.h).
ModelConfig load_model_config(const std::filesystem::path& dir_or_file);

}  // namespace qlora
