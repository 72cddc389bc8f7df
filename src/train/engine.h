// Where a run's model, LoRA parameters and optimizer state live and are
// updated: the trainer's step loop calls these, whichever backend computes.
// The host LoraWeights and Optimizer stay the run's canonical copies for
// checkpoints, adapters and samples: a device engine copies into them
// (pull) before those are written, and from them (push) after a resume.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

#include "model/llama.h"
#include "model/lora.h"
#include "model/token_generator.h"
#include "model/trainable.h"
#include "model/weights.h"
#include "plan/plan.h"
#include "train/optimizer.h"

namespace qlora {

class StepEngine {
 public:
  virtual ~StepEngine() = default;
  virtual TrainableModel& model() = 0;
  virtual void zero_grad() = 0;
  // Global L2 norm of the gradients, clipped as torch's clip_grad_norm_ does.
  virtual double clip_grad_norm(double max_norm) = 0;
  virtual void optimizer_step(double lr) = 0;
  // Waits for the work queued so far (no-op on the CPU): for timing.
  virtual void synchronize() = 0;
  // Device -> host LoraWeights/Optimizer (no-op on the CPU).
  virtual void pull() = 0;
  // Host -> device (no-op on the CPU).
  virtual void push() = 0;
  // DoRA: each magnitude set to the row norms of W + s B A (PEFT's
  // initialisation), on the host LoraWeights and wherever the engine keeps a
  // copy. On the GPU the norms are computed on the device: the CUDA engine
  // keeps no host copy of the base. No-op without DoRA.
  virtual void init_dora_magnitudes() = 0;
  // Bytes the run holds now, for the progress line and the metrics.
  virtual uint64_t memory_bytes() const = 0;
  // Planned against measured memory, for the end of the run and the report.
  virtual std::string measured_text(const MemoryPlan& plan) const = 0;
  // Generation on this engine's model with the LoRA parameters it holds now,
  // for up to max_seq tokens (the GPU caps it at the run's seq_len: capacity()
  // says). Not between a forward and its backward.
  virtual std::unique_ptr<TokenGenerator> generator(int64_t max_seq) = 0;
};

// The fp32 reference: LlamaModel on lora's and opt's own host arrays.
std::unique_ptr<StepEngine> make_cpu_engine(const LlamaWeights& w, LoraWeights& lora, Optimizer& opt,
                                            int64_t max_B, int64_t max_T, LlamaRunOptions run);
// CudaLlamaModel + the fused optimizer (paged when opt is paged_adamw) on
// device 0. Throws qlora::Error in builds without CUDA.
std::unique_ptr<StepEngine> make_cuda_engine(const LlamaWeights& w, LoraWeights& lora, Optimizer& opt,
                                             int64_t max_B, int64_t max_T, LlamaRunOptions run);
// The same engine with the base weights streamed from an HF folder to the
// device (stream_llama_weights: one tensor at a time in host memory, no host
// copy of the model); the folder is checked before anything is allocated.
std::unique_ptr<StepEngine> make_cuda_engine(const std::filesystem::path& model_dir, const WeightLoadOptions& wopt,
                                             LoraWeights& lora, Optimizer& opt, int64_t max_B, int64_t max_T,
                                             LlamaRunOptions run);

}  // namespace qlora
