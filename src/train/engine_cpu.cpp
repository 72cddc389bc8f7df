#include "train/engine.h"

#include "model/llama_generate.h"

namespace qlora {

namespace {

class CpuEngine final : public StepEngine {
 public:
  CpuEngine(const LlamaWeights& w, LoraWeights& lora, Optimizer& opt, int64_t max_B, int64_t max_T,
            LlamaRunOptions run)
      : w_(w), lora_(lora), opt_(opt), model_(w, &lora, max_B, max_T, run) {}

  TrainableModel& model() override { return model_; }
  void zero_grad() override { lora_.zero_grad(); }
  double clip_grad_norm(double max_norm) override {
    return qlora::clip_grad_norm(lora_.flat_grads(), lora_.flat_size(), max_norm);
  }
  void optimizer_step(double lr) override { opt_.step(lora_.flat_params(), lora_.flat_grads(), lr); }
  void synchronize() override {}
  void pull() override {}
  void push() override {}
  void init_dora_magnitudes() override { qlora::init_dora_magnitudes(lora_, w_); }
  uint64_t memory_bytes() const override { return arenas().total(); }
  std::string measured_text(const MemoryPlan& plan) const override { return plan_vs_measured_text(plan, arenas()); }
  std::unique_ptr<TokenGenerator> generator(int64_t max_seq) override {
    return std::make_unique<LlamaGenerator>(w_, &lora_, max_seq);
  }

 private:
  CpuArenas arenas() const {
    CpuArenas m;
    m.weights = w_.arena.capacity();
    m.lora_params = lora_.params_bytes();
    m.lora_grads = lora_.grads_bytes();
    m.optimizer = opt_.state_bytes();
    m.activations = model_.activation_bytes();
    return m;
  }

  const LlamaWeights& w_;
  LoraWeights& lora_;
  Optimizer& opt_;
  LlamaModel model_;
};

}  // namespace

std::unique_ptr<StepEngine> make_cpu_engine(const LlamaWeights& w, LoraWeights& lora, Optimizer& opt,
                                            int64_t max_B, int64_t max_T, LlamaRunOptions run) {
  return std::make_unique<CpuEngine>(w, lora, opt, max_B, max_T, run);
}

}  // namespace qlora
