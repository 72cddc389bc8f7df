#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "train/engine.h"

#if QLORA_HAVE_CUDA
#include "kernels/cuda/context.h"
#include "kernels/cuda/optim_cuda.h"
#include "kernels/cuda/paged_state.h"
#include "model/llama_cuda.h"
#endif

namespace qlora {

#if QLORA_HAVE_CUDA

namespace {

// The model on the GPU; the optimizer state on the GPU, or paged from pinned
// host memory for paged_adamw. Gradient clipping and the update never leave
// the device; only the norm (8 bytes) comes back per step.
class CudaEngine final : public StepEngine {
 public:
  CudaEngine(const LlamaWeights& w, LoraWeights& lora, Optimizer& opt, int64_t max_B, int64_t max_T,
             LlamaRunOptions run)
      : lora_(lora), opt_(opt), model_(ctx_, w, &lora, max_B, max_T, run), n_(model_.lora_size()) {
    init();
  }
  CudaEngine(const std::filesystem::path& model_dir, const WeightLoadOptions& wopt, LoraWeights& lora,
             Optimizer& opt, int64_t max_B, int64_t max_T, LlamaRunOptions run)
      : lora_(lora), opt_(opt), model_(ctx_, model_dir, wopt, &lora, max_B, max_T, run), n_(model_.lora_size()) {
    init();
  }
  ~CudaEngine() override {
    paged_.reset();  // waits for ctx_'s streams, so before ctx_ goes
  }

 private:
  // The optimizer state beside the model, then the host LoRA/state pushed.
  void init() {
    const OptimizerConfig& c = opt_.config();
    if (c.kind == OptimizerKind::paged_adamw) {
      paged_ = std::make_unique<PagedAdamState>(ctx_, n_);
    } else {
      m_ = DeviceBuffer<float>(size_t(n_));  // adamw m, or sgd's momentum buffer
      if (c.kind == OptimizerKind::adamw) v_ = DeviceBuffer<float>(size_t(n_));
    }
    // LoRA+: the optimizer's ranges as [begin, end) pairs on the device.
    if (c.plus_lr_ratio != 1.0 && !opt_.plus_ranges().empty()) {
      std::vector<int64_t> r;
      for (const FlatRange& fr : opt_.plus_ranges()) {
        r.push_back(int64_t(fr.begin));
        r.push_back(int64_t(fr.end));
      }
      plus_ = DeviceBuffer<int64_t>(r.size());
      plus_.upload(r.data(), r.size());
    }
    norm_ws_ = DeviceBuffer<uint8_t>(cuda_ops::sum_squares_workspace_bytes(n_));
    norm_ = DeviceBuffer<double>(1);
    push();
  }

 public:
  TrainableModel& model() override { return model_; }
  void zero_grad() override { model_.zero_grad(); }

  double clip_grad_norm(double max_norm) override {
    cudaStream_t s = ctx_.stream();
    cuda_ops::sum_squares(model_.lora_grads(), n_, norm_.data(), norm_ws_.data(), s);
    double sq = 0;
    QLORA_CUDA_CHECK(cudaMemcpyAsync(&sq, norm_.data(), sizeof(double), cudaMemcpyDeviceToHost, s));
    QLORA_CUDA_CHECK(cudaStreamSynchronize(s));
    const double norm = std::sqrt(sq);
    // As clip_grad_norm (train/optimizer.cpp): one fp32 multiplier, skipped at 1.
    if (max_norm > 0.0) {
      const double coef = max_norm / (norm + 1e-6);
      if (coef < 1.0) cuda_ops::scale_inplace(model_.lora_grads(), n_, float(coef), s);
    }
    return norm;
  }

  void optimizer_step(double lr) override {
    const OptimizerConfig& c = opt_.config();
    cuda_ops::OptimStep st;
    st.kind = c.kind == OptimizerKind::sgd ? 1 : 0;
    st.t = opt_.steps() + 1;
    st.lr = lr;
    st.beta1 = c.beta1;
    st.beta2 = c.beta2;
    st.eps = c.eps;
    st.weight_decay = c.weight_decay;
    st.momentum = c.momentum;
    st.plus_lr_ratio = c.plus_lr_ratio;
    st.plus = plus_.data();
    st.n_plus = int64_t(plus_.size() / 2);
    if (paged_) {
      paged_->step(model_.lora_master(), model_.lora_bf16(), model_.lora_grads(), st);
    } else {
      float* m = st.kind == 1 && c.momentum == 0.0 ? nullptr : m_.data();
      cuda_ops::optimizer_step(model_.lora_master(), model_.lora_bf16(), model_.lora_grads(), m, v_.data(), n_, st,
                               ctx_.stream());
    }
    opt_.set_steps(st.t);
  }

  void synchronize() override { ctx_.synchronize(); }

  void pull() override {
    ctx_.synchronize();
    model_.download_lora(lora_.flat_params());
    const auto state = opt_.state();
    for (size_t i = 0; i < state.size(); ++i) {
      if (paged_) {
        std::memcpy(state[i].data, i == 0 ? paged_->host_m() : paged_->host_v(), state[i].n * sizeof(float));
      } else {
        (i == 0 ? m_ : v_).download(state[i].data, state[i].n);
      }
    }
  }

  void push() override {
    ctx_.synchronize();
    model_.upload_lora(lora_.flat_params());
    const auto state = opt_.state();
    for (size_t i = 0; i < state.size(); ++i) {
      if (paged_) {
        std::memcpy(i == 0 ? paged_->host_m() : paged_->host_v(), state[i].data, state[i].n * sizeof(float));
      } else {
        (i == 0 ? m_ : v_).upload(state[i].data, state[i].n);  // on the device when it returns
      }
    }
  }

  void init_dora_magnitudes() override {
    model_.init_dora_magnitudes();
    model_.download_lora(lora_.flat_params());
  }

  uint64_t memory_bytes() const override {
    return model_.device_bytes() + m_.bytes() + v_.bytes() + (paged_ ? paged_->device_bytes() : 0);
  }

  std::unique_ptr<TokenGenerator> generator(int64_t max_seq) override {
    return std::make_unique<CudaTokenGenerator>(model_, std::min(max_seq, model_.max_T()));
  }

  std::string measured_text(const MemoryPlan& plan) const override {
    const CudaDeviceInfo info = cuda_device_info(ctx_.device());
    return str("GPU memory: planned ", plan.device_bytes >> 20, " MiB; qlora's buffers ", memory_bytes() >> 20,
               " MiB; in use on ", info.name, " (all processes, context included) ",
               (info.total_bytes - info.free_bytes) >> 20, " MiB\n");
  }

 private:
  LoraWeights& lora_;
  Optimizer& opt_;
  CudaContext ctx_;  // declared before everything that queues work on it
  CudaLlamaModel model_;
  int64_t n_;
  DeviceBuffer<float> m_, v_;
  std::unique_ptr<PagedAdamState> paged_;
  DeviceBuffer<uint8_t> norm_ws_;
  DeviceBuffer<double> norm_;
  DeviceBuffer<int64_t> plus_;  // LoRA+ ranges, [begin, end) pairs (empty: plain LoRA)
};

}  // namespace

std::unique_ptr<StepEngine> make_cuda_engine(const LlamaWeights& w, LoraWeights& lora, Optimizer& opt,
                                             int64_t max_B, int64_t max_T, LlamaRunOptions run) {
  return std::make_unique<CudaEngine>(w, lora, opt, max_B, max_T, run);
}

std::unique_ptr<StepEngine> make_cuda_engine(const std::filesystem::path& model_dir, const WeightLoadOptions& wopt,
                                             LoraWeights& lora, Optimizer& opt, int64_t max_B, int64_t max_T,
                                             LlamaRunOptions run) {
  return std::make_unique<CudaEngine>(model_dir, wopt, lora, opt, max_B, max_T, run);
}

#else

std::unique_ptr<StepEngine> make_cuda_engine(const LlamaWeights&, LoraWeights&, Optimizer&, int64_t, int64_t,
                                             LlamaRunOptions) {
  fail("this build has no CUDA backend (nvcc was not found when it was configured)");
}

std::unique_ptr<StepEngine> make_cuda_engine(const std::filesystem::path&, const WeightLoadOptions&, LoraWeights&,
                                             Optimizer&, int64_t, int64_t, LlamaRunOptions) {
  fail("this build has no CUDA backend (nvcc was not found when it was configured)");
}

#endif

}  // namespace qlora
