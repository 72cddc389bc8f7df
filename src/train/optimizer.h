// Optimizers over the LoRA parameters (LoraWeights::flat_params, one fp32
// array; on the CPU it is its own fp32 master copy): AdamW with decoupled
// weight decay and bias correction, and SGD with optional momentum. Their
// state lives in one arena sized in the constructor (optimizer_state_bytes,
// which the memory planner calls too), so a step allocates nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/arena.h"
#include "core/flat_range.h"

namespace qlora {

enum class OptimizerKind { adamw, paged_adamw, sgd };
// "adamw" | "paged_adamw" | "sgd"; anything else -> Error listing them.
OptimizerKind parse_optimizer_kind(std::string_view name);
const char* optimizer_kind_name(OptimizerKind k);

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::adamw;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;
  double momentum = 0.0;  // sgd
  // LoRA+ (PEFT's create_loraplus_optimizer): the elements in `plus_ranges`
  // (the B matrices and DoRA magnitudes: LoraWeights::plus_ranges) step at
  // lr * plus_lr_ratio, everything else at lr. 1 = plain LoRA.
  double plus_lr_ratio = 1.0;
};


// Bytes of the state arena for n_params fp32 parameters (AdamW: m and v;
// SGD: the momentum buffer when momentum > 0, else nothing). paged_adamw has
// the same state as adamw; on the CPU nothing pages.
size_t optimizer_state_bytes(const OptimizerConfig& c, size_t n_params);

class Optimizer {
 public:
  // plus_ranges: sorted, disjoint, inside [0, n_params): where
  // c.plus_lr_ratio applies (ignored when the ratio is 1).
  Optimizer(const OptimizerConfig& c, size_t n_params, std::vector<FlatRange> plus_ranges = {});

  // One update of params from grads (both n_params floats) at learning rate
  // lr (lr * plus_lr_ratio inside plus_ranges); increments steps().
  void step(float* params, const float* grads, double lr);
  int64_t steps() const { return t_; }

  // The state as named fp32 arrays, for checkpoints ("exp_avg",
  // "exp_avg_sq" or "momentum_buffer"), and restore from them.
  struct StateTensor {
    std::string name;
    float* data;
    size_t n;
  };
  std::vector<StateTensor> state();
  void set_steps(int64_t t) { t_ = t; }
  size_t state_bytes() const { return state_.capacity(); }
  const OptimizerConfig& config() const { return c_; }
  const std::vector<FlatRange>& plus_ranges() const { return plus_; }

 private:
  // The update of elements [lo, hi) at learning rate lr, step t.
  void update(float* params, const float* grads, int64_t lo, int64_t hi, double lr, int64_t t);

  OptimizerConfig c_;
  size_t n_;
  std::vector<FlatRange> plus_;
  int64_t t_ = 0;
  Arena state_;
  float *m_ = nullptr, *v_ = nullptr;
};

// Global L2 norm of n gradient values (accumulated in double).
double grad_norm(const float* grads, size_t n);
// Scales grads so that their norm is at most max_norm (max_norm <= 0: no
// clipping). Returns the norm before clipping.
double clip_grad_norm(float* grads, size_t n, double max_norm);

}  // namespace qlora
