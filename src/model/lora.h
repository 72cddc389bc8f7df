// LoRA adapters on the block linears: for a target with base weight W (OUT,IN),
// y = x W^T + scale * dropout(x) A^T B^T, A (R,IN), B (OUT,R), scale = alpha/R
// (rsLoRA: alpha/sqrt(R)). R and alpha may differ per module (PEFT's
// rank_pattern / alpha_pattern). With DoRA each adapted linear also has a
// magnitude m (OUT) (see ops::dora_*). A, B (and m) of every adapted linear
// live in one arena, their gradients in a second arena of the same layout
// (zeroing = one memset). Names and shapes follow PEFT: lora_A [r, in],
// lora_B [out, r], lora_magnitude_vector [out].
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
#include "core/flat_range.h"

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
  // PEFT's rank_pattern / alpha_pattern, in the order given: a module takes
  // the value of the first key k for which Python's
  // re.match(rf"(.*\.)?({k})$", module_name) matches (peft.utils.other.
  // get_pattern_key), else rank / alpha. Module names as PEFT sees them:
  // "model.layers.3.mlp.down_proj" (lora_module_name).
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  bool dora = false;  // PEFT's use_dora: a magnitude vector per adapted linear
  // The scale of the default rank and alpha (modules without a pattern).
  float scale() const;
};

// (IN, OUT) of a target's base linear.
std::pair<int64_t, int64_t> lora_target_dims(const ModelConfig& cfg, LoraTarget t);

// "model.layers.{layer}.self_attn.q_proj" / ".mlp.down_proj": the name PEFT
// matches target_modules, rank_pattern and alpha_pattern against.
std::string lora_module_name(int64_t layer, LoraTarget t);

// The rank, alpha and scale of every (layer, target), patterns applied
// (index layer * kNumLoraTargets + target; targets that are off too). A
// pattern key that matches no block linear of the model, or is not a valid
// regular expression, throws qlora::Error naming "rank_pattern" /
// "alpha_pattern", the key, and the module names that exist; a rank below 1
// or an alpha that is not a positive number throws too.
struct LoraModuleParams {
  int64_t rank = 0;
  double alpha = 0.0;
  float scale = 0.0f;  // alpha/rank, rsLoRA alpha/sqrt(rank)
};
std::vector<LoraModuleParams> lora_module_params(const ModelConfig& cfg, const LoraConfig& lc);
// The largest rank of target t over the layers (0 when t is off).
int64_t lora_max_rank(const ModelConfig& cfg, const LoraConfig& lc, LoraTarget t);

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
  // A (R,IN), B (OUT,R), the DoRA magnitude M (OUT) and their gradients;
  // nullptr when the target is off (M, dM also without DoRA).
  float* A(int64_t layer, LoraTarget t) { return slot(layer, t).A; }
  float* B(int64_t layer, LoraTarget t) { return slot(layer, t).B; }
  float* M(int64_t layer, LoraTarget t) { return slot(layer, t).M; }
  float* dA(int64_t layer, LoraTarget t) { return slot(layer, t).dA; }
  float* dB(int64_t layer, LoraTarget t) { return slot(layer, t).dB; }
  float* dM(int64_t layer, LoraTarget t) { return slot(layer, t).dM; }
  const float* A(int64_t layer, LoraTarget t) const { return slot(layer, t).A; }
  const float* B(int64_t layer, LoraTarget t) const { return slot(layer, t).B; }
  const float* M(int64_t layer, LoraTarget t) const { return slot(layer, t).M; }
  // This module's rank R and scale (patterns applied).
  int64_t rank(int64_t layer, LoraTarget t) const { return slot(layer, t).rank; }
  float scale(int64_t layer, LoraTarget t) const { return slot(layer, t).scale; }
  double alpha(int64_t layer, LoraTarget t) const { return slot(layer, t).alpha; }
  // The largest rank of any module (rank_pattern applied); 0 with no target.
  int64_t max_rank() const;
  // Where LoRA+ raises the learning rate: every B and every magnitude vector
  // (PEFT's create_loraplus_optimizer puts lora_B and 1-d parameters in the
  // lr * ratio group), as sorted ranges of flat_params().
  std::vector<FlatRange> plus_ranges() const;

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
  // "base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector"
  // (PEFT 0.22 saves the magnitude without ".weight").
  std::string peft_magnitude_name(int64_t layer, LoraTarget t) const;

  // Reads a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
  // An adapter for another architecture or shape (layer count, dims, rank)
  // throws qlora::Error naming the tensor or file.
  static LoraWeights load_peft(const std::filesystem::path& dir, const ModelConfig& cfg);

 private:
  struct Slot {
    float *A = nullptr, *B = nullptr, *M = nullptr, *dA = nullptr, *dB = nullptr, *dM = nullptr;
    int64_t rank = 0;
    double alpha = 0.0;
    float scale = 0.0f;
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
