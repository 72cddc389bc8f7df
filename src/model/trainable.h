// What the trainer and the evaluator need of a model, whichever backend
// computes it: LlamaModel (CPU, fp32) and CudaLlamaModel (GPU, bf16) both
// implement it with the same meaning (read LlamaModel's comments).
#pragma once

#include <cstdint>

namespace qlora {

struct LlamaBatch;

class TrainableModel {
 public:
  virtual ~TrainableModel() = default;
  // This micro-batch's loss: sum of its target losses / n_targets_step (<= 0:
  // its own target count). Keeps what backward needs.
  virtual double forward(const LlamaBatch& batch, int64_t n_targets_step = 0) = 0;
  // Accumulates (+=) the LoRA gradients of the last forward's loss.
  virtual void backward() = 0;
  virtual int64_t last_num_targets() const = 0;
  // Forward passes in training mode so far (they seed the dropout masks).
  virtual uint64_t forward_count() const = 0;
  virtual void set_forward_count(uint64_t n) = 0;
  // Evaluation mode: no dropout, forward_count() does not advance.
  virtual void set_training(bool training) = 0;
  virtual bool training() const = 0;
};

}  // namespace qlora
