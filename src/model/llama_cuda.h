// The Llama-family model on the GPU: the same flat list of ops as LlamaModel
// (model/llama.cpp, the fp32 reference it must track), through the CUDA ops
// of kernels/cuda/ with bf16 activations and fp32 statistics, residual
// gradient and LoRA gradients.
//
// Device memory: the base weights (4-bit codes + fp32 scales, or bf16),
// the LoRA parameters as one flat array in LoraWeights' layout (fp32 master,
// bf16 copy the products read, fp32 gradients), and one activation arena
// sized for (max_B, max_T) in the constructor; forward and backward allocate
// nothing (the op workspace is grown to its largest need up front).
//
// Compiled only in CUDA builds (QLORA_HAVE_CUDA).
#pragma once

#if QLORA_HAVE_CUDA

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/cuda/context.h"
#include "kernels/cuda/linear_cuda.h"
#include "model/llama.h"
#include "model/lora.h"
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
  ~CudaLlamaModel() override;
  CudaLlamaModel(const CudaLlamaModel&) = delete;
  CudaLlamaModel& operator=(const CudaLlamaModel&) = delete;

  double forward(const LlamaBatch& batch, int64_t n_targets_step = 0) override;
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

  // Device bytes held: weights, LoRA, activations, op workspace.
  size_t device_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  float* master_ = nullptr;
  uint16_t* params_bf16_ = nullptr;
  float* grads_ = nullptr;
  int64_t lora_n_ = 0;
  int64_t n_targets_ = 0;
  uint64_t step_ = 0;
  bool training_ = true;
};

}  // namespace qlora

#endif  // QLORA_HAVE_CUDA
