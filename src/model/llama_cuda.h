// The Llama-family model on the GPU: the same flat list of ops as LlamaModel
// (model/llama.cpp, the fp32 reference it must track), through the CUDA ops
// of kernels/cuda/ with bf16 activations and fp32 statistics, residual
// gradient and LoRA gradients.
//
// Device memory: the base weights (4-bit codes with their scales in the
// double-quantized form when the host keeps one, else fp32; or bf16),
// the LoRA parameters as one flat array in LoraWeights' layout (fp32 master,
// bf16 copy the products read, fp32 gradients), and one activation arena
// sized for (max_B, max_T) in the constructor; forward and backward allocate
// nothing (the op workspace is grown to its largest need up front). DoRA's
// magnitudes are part of the flat LoRA arrays; its norms, product buffers and
// norm panel are in the arena.
//
// Compiled only in CUDA builds (QLORA_HAVE_CUDA).
#pragma once

#if QLORA_HAVE_CUDA

#include <cstdint>
#include <filesystem>
#include <memory>
#include <vector>

#include "kernels/cuda/context.h"
#include "kernels/cuda/linear_cuda.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/token_generator.h"
#include "model/trainable.h"
#include "model/weights.h"

namespace qlora {

class CudaLlamaModel : public TrainableModel {
 public:
  // Uploads w (rounding dense fp32 tensors to bf16) and lora's current
  // parameters. lora may be null (base model only). The model keeps no
  // reference to w or lora.
  CudaLlamaModel(CudaContext& ctx, const LlamaWeights& w, const LoraWeights* lora, int64_t max_B, int64_t max_T,
                 LlamaRunOptions opt = {});
  // The same model (the same device bytes as from load_llama_weights(model_dir,
  // wopt)) streamed from the folder tensor by tensor (stream_llama_weights):
  // the host holds one tensor at a time, never the whole model. The folder's
  // config and tensor table are checked before anything is allocated here.
  CudaLlamaModel(CudaContext& ctx, const std::filesystem::path& model_dir, const WeightLoadOptions& wopt,
                 const LoraWeights* lora, int64_t max_B, int64_t max_T, LlamaRunOptions opt = {});
  ~CudaLlamaModel() override;
  CudaLlamaModel(const CudaLlamaModel&) = delete;
  CudaLlamaModel& operator=(const CudaLlamaModel&) = delete;

  double forward(const LlamaBatch& batch, int64_t n_targets_step = 0) override;
  int64_t max_T() const { return max_T_; }
  void backward() override;
  int64_t last_num_targets() const override { return n_targets_; }
  uint64_t forward_count() const override { return step_; }
  void set_forward_count(uint64_t n) override { step_ = n; }
  void set_training(bool training) override { training_ = training; }
  bool training() const override { return training_; }

  // The flat LoRA arrays (device pointers, lora_size() elements each).
  int64_t lora_size() const { return lora_n_; }
  float* lora_master() { return master_; }
  uint16_t* lora_bf16() { return params_bf16_; }
  float* lora_grads() { return grads_; }
  void zero_grad();
  // Host <-> device copies of the flat parameters (LoraWeights::flat_params
  // layout); upload also refreshes the bf16 copy. Synchronous.
  void upload_lora(const float* host);
  void download_lora(float* host) const;
  void download_grads(float* host) const;

  // DoRA: sets every magnitude to the row norms of W + s B A from the current
  // masters (PEFT's initialisation: with B = 0 the norms of W), computed on
  // the device, as init_dora_magnitudes (model/llama.h) does on the host (which
  // needs the host's copy of the base, and the GPU engine keeps none). The
  // bf16 copies follow; download_lora gives the host the result. No-op
  // without DoRA. Synchronous.
  void init_dora_magnitudes();

  // Device bytes held: weights, LoRA, activations, op workspace.
  size_t device_bytes() const;
  // Of which the base weights (the plan's "base weights" lines).
  size_t weight_bytes() const;

  // Evaluation-mode forward of one sequence of T <= max_T tokens (positions
  // 0..T-1, one document) with the current LoRA parameters; writes the fp32
  // logits (vocab_size, host memory) of the token after the last one. Leaves
  // training() and forward_count() as they were; not between forward and
  // backward.
  void last_logits(const int32_t* tokens, int64_t T, float* logits);

 private:
  struct Impl;
  // The constructors' common parts: before the weights, and everything after them.
  void check_shape(int64_t max_B, int64_t max_T);
  void finish(const LoraWeights* lora);
  std::unique_ptr<Impl> impl_;
  float* master_ = nullptr;
  uint16_t* params_bf16_ = nullptr;
  float* grads_ = nullptr;
  int64_t lora_n_ = 0;
  int64_t n_targets_ = 0;
  int64_t max_T_ = 0;
  uint64_t step_ = 0;
  bool training_ = true;
};

// Generation on the GPU without a KV cache: each feed runs the whole sequence
// so far through CudaLlamaModel::last_logits. For the replies it serves (the
// samples of `qlora run`, `qlora generate`: tens to hundreds of tokens) a step
// is one pass over the base weights plus a small prefix, tens of milliseconds
// even at 70B, and it needs no memory beyond the model's own.
class CudaTokenGenerator final : public TokenGenerator {
 public:
  // Drives `model` (not owned): capacity is max_seq, at most the model's max_T.
  CudaTokenGenerator(CudaLlamaModel& model, int64_t max_seq);
  void feed(const int32_t* tokens, int64_t T, float* logits) override;
  int64_t length() const override { return int64_t(ids_.size()); }
  int64_t capacity() const override { return max_seq_; }

 private:
  CudaLlamaModel& model_;
  int64_t max_seq_;
  std::vector<int32_t> ids_;
};

// A generator that owns its context and its model (B = 1, T = max_seq) on
// device 0, the base weights streamed from the folder (no host copy):
// `qlora generate --device cuda`.
std::unique_ptr<TokenGenerator> make_cuda_generator(const std::filesystem::path& model_dir,
                                                    const WeightLoadOptions& wopt, const LoraWeights* lora,
                                                    int64_t max_seq);

}  // namespace qlora

#endif  // QLORA_HAVE_CUDA
