// LoRA adapters on the block linears: for a target with base weight W (OUT,IN),
// y = x W^T + scale * dropout(x) A^T B^T, A (R,IN), B (OUT,R), scale = alpha/R
// (rsLoRA: alpha/sqrt(R)). A and B of every adapted linear live in one arena,
// their gradients in a second arena of the same layout (zeroing = one memset).
// Names and shapes follow PEFT: lora_A [r, in], lora_B [out, r].
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/arena.h"
#include "io/hf_config.h"

namespace qlora {

enum class LoraTarget { Q, K, V, O, Gate, Up, Down };
inline constexpr int kNumLoraTargets = 7;
std::string_view lora_target_module(LoraTarget t);  // "q_proj", ..., "down_proj"

enum class TensorKind;  // model/tensor_table.h (declared here so this header need not pull in the table)
// The target whose base weight a checkpoint tensor is (TensorKind::Q -> Q,
// ..., Down -> Down); nullopt for every other tensor, biases included.
std::optional<LoraTarget> lora_target_of(TensorKind k);

struct LoraConfig {
  int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool rslora = false;
  std::array<bool, kNumLoraTargets> targets{true, true, true, true, true, true, true};
  uint64_t seed = 0;  // dropout masks
  float scale() const;
};

// (IN, OUT) of a target's base linear.
std::pair<int64_t, int64_t> lora_target_dims(const ModelConfig& cfg, LoraTarget t);

class LoraWeights {
 public:
  LoraWeights(const ModelConfig& cfg, const LoraConfig& lc);

  // Bytes of the two arenas a LoraWeights of this config allocates (the same
  // layout code in measuring mode; the memory planner's figures). params / 4
  // is flat_size().
  struct ArenaBytes {
    size_t params = 0, grads = 0;
  };
  static ArenaBytes arena_bytes(const ModelConfig& cfg, const LoraConfig& lc);
  size_t params_bytes() const { return params_.capacity(); }
  size_t grads_bytes() const { return grads_.capacity(); }

  const LoraConfig& config() const { return lc_; }
  bool has(LoraTarget t) const { return lc_.targets[size_t(t)]; }
  // A (R,IN), B (OUT,R) and their gradients; nullptr when the target is off.
  float* A(int64_t layer, LoraTarget t) { return slot(layer, t).A; }
  float* B(int64_t layer, LoraTarget t) { return slot(layer, t).B; }
  float* dA(int64_t layer, LoraTarget t) { return slot(layer, t).dA; }
  float* dB(int64_t layer, LoraTarget t) { return slot(layer, t).dB; }
  const float* A(int64_t layer, LoraTarget t) const { return slot(layer, t).A; }
  const float* B(int64_t layer, LoraTarget t) const { return slot(layer, t).B; }

  // PEFT's default init: A ~ U(-1/sqrt(IN), 1/sqrt(IN)) (kaiming_uniform with
  // a = sqrt(5)), B = 0, so the adapted model starts equal to the base.
  void init_default(uint64_t seed);
  void zero_grad() { grads_.zero(); }
  size_t num_params() const;

  // Every A and B as one flat fp32 array, and the gradients in the same layout
  // (alignment padding between tensors is zero in both and stays zero under
  // any element-wise update): what optimizers, grad-norm clipping and
  // checkpoints work on.
  float* flat_params() { return reinterpret_cast<float*>(params_.data()); }
  const float* flat_params() const { return reinterpret_cast<const float*>(params_.data()); }
  float* flat_grads() { return reinterpret_cast<float*>(grads_.data()); }
  const float* flat_grads() const { return reinterpret_cast<const float*>(grads_.data()); }
  size_t flat_size() const { return params_.used() / sizeof(float); }

  // "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"
  std::string peft_name(int64_t layer, LoraTarget t, bool is_a) const;

  // Reads a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
  // An adapter for another architecture or shape (layer count, dims, rank)
  // throws qlora::Error naming the tensor or file.
  static LoraWeights load_peft(const std::filesystem::path& dir, const ModelConfig& cfg);

 private:
  struct Slot {
    float *A = nullptr, *B = nullptr, *dA = nullptr, *dB = nullptr;
  };
  Slot& slot(int64_t layer, LoraTarget t) { return slots_[size_t(layer * kNumLoraTargets + int64_t(t))]; }
  const Slot& slot(int64_t layer, LoraTarget t) const {
    return slots_[size_t(layer * kNumLoraTargets + int64_t(t))];
  }
  static void layout(Arena& p, Arena& g, const ModelConfig& cfg, const LoraConfig& lc, std::vector<Slot>& slots);

  ModelConfig cfg_;
  LoraConfig lc_;
  Arena params_, grads_;
  std::vector<Slot> slots_;
};

}  // namespace qlora
