// The whole model on the GPU against the fp32 CPU reference: loss and LoRA
// gradients of builtin:tiny (4 layers, GQA, NF4 base), and a 50-step
// `qlora run` whose loss curve on CUDA tracks the CPU one. Skips without a GPU.
//
// Threshold. The CPU computes in fp32 throughout; the GPU rounds every
// activation to bf16 (relative error <= 2^-8 per rounding, see
// test_cuda_ops.cpp). To first order the errors of the roundings along the
// longest chain add up (each op is well conditioned on these inputs: norms
// rescale, the residual adds, softmax and cross entropy are Lipschitz 1), so
// the relative error of the loss and of the gradient vector is at most
// 2^-8 x (roundings on the chain). Per layer forward: norm, q/k/v, rope,
// attention, o, residual, norm, gate/up, swiglu, down, residual = 11, and
// backward as many again; plus the final norm and the loss: k = 22 L + 4
// (92 for 4 layers: a bound of 0.36 relative). Loose, but an indexing or
// masking error is wrong by O(1) and shows far above it; the 50-step check
// below is the finer one in practice.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda_testing.h"
#include "model/builtin.h"
#include "model/llama.h"
#include "model/weights.h"
#include "test_models.h"
#include "testing.h"
#include "train/metrics.h"

#if QLORA_HAVE_CUDA
#include "model/llama_cuda.h"
#endif

namespace qlora {
namespace {

#if QLORA_HAVE_CUDA

double chain_bound(int64_t layers) { return std::ldexp(double(22 * layers + 4), -8); }

// Two rows of T tokens, each packing two documents (positions restart).
struct Batch {
  std::vector<int32_t> tokens, targets, positions;
  LlamaBatch view(int64_t B, int64_t T) const { return {tokens.data(), targets.data(), positions.data(), B, T}; }
};
Batch make_batch(int64_t B, int64_t T, int64_t V) {
  Batch b;
  for (int64_t r = 0; r < B; ++r)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t split = T / 3 + r;
      b.tokens.push_back(int32_t((r * 131 + t * 17 + 5) % V));
      b.targets.push_back(t % 7 == 3 ? ops::kIgnoreIndex : int32_t((r * 37 + t * 11 + 1) % V));
      b.positions.push_back(int32_t(t < split ? t : t - split));
    }
  return b;
}

double rel_l2(const std::vector<float>& cpu, const std::vector<float>& gpu) {
  double num = 0, den = 0;
  for (size_t i = 0; i < cpu.size(); ++i) {
    num += (double(gpu[i]) - cpu[i]) * (double(gpu[i]) - cpu[i]);
    den += double(cpu[i]) * cpu[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

TEST(CudaModel, LossAndLoraGradientsTrackTheCpu) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));
  const ModelConfig& cfg = w.cfg;
  const int64_t B = 2, T = 48;
  const Batch batch = make_batch(B, T, cfg.vocab_size);
  for (const double dropout : {0.0, 0.1})
    for (const bool checkpointing : {false, true}) {
      const std::string what = "dropout " + std::to_string(dropout) + (checkpointing ? ", checkpointing" : "");
      LoraConfig lc;
      lc.rank = 8;
      lc.dropout = dropout;
      lc.seed = 7;
      LoraWeights cpu_lora = testing::random_lora(cfg, lc, 100, 0.05f);
      LlamaRunOptions opt;
      opt.checkpointing = checkpointing;
      opt.ce.rows = 32;     // several row and vocabulary chunks
      opt.ce.vchunk = 200;
      LlamaModel cpu(w, &cpu_lora, B, T, opt);
      const double cpu_loss = cpu.forward(batch.view(B, T));
      cpu.backward();

      CudaContext ctx;
      CudaLlamaModel gpu(ctx, w, &cpu_lora, B, T, opt);
      const double gpu_loss = gpu.forward(batch.view(B, T));
      gpu.backward();
      EXPECT_LE(std::abs(gpu_loss - cpu_loss), chain_bound(cfg.num_hidden_layers) * cpu_loss) << what;
      EXPECT_EQ(gpu.last_num_targets(), cpu.last_num_targets()) << what;

      std::vector<float> grads(cpu_lora.flat_size());
      gpu.download_grads(grads.data());
      const std::vector<float> want(cpu_lora.flat_grads(), cpu_lora.flat_grads() + cpu_lora.flat_size());
      for (float g : grads) ASSERT_TRUE(std::isfinite(g)) << what;
      EXPECT_LE(rel_l2(want, grads), chain_bound(cfg.num_hidden_layers)) << what;

      // Evaluation mode: no dropout, the forward count stays.
      gpu.set_training(false);
      const uint64_t count = gpu.forward_count();
      (void)gpu.forward(batch.view(B, T));
      EXPECT_EQ(gpu.forward_count(), count) << what;
    }
}

TEST(CudaModel, BadTokensAndTargetsAreNamed) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));
  Batch b = make_batch(1, 16, w.cfg.vocab_size);
  CudaContext ctx;
  CudaLlamaModel gpu(ctx, w, nullptr, 1, 16);
  b.tokens[5] = int32_t(w.cfg.vocab_size);
  EXPECT_NE(testing::error_of([&] { gpu.forward(b.view(1, 16)); }).find("token id 512 at position 5"),
            std::string::npos);
  b.tokens[5] = 0;
  b.targets[9] = -3;
  EXPECT_NE(testing::error_of([&] { gpu.forward(b.view(1, 16)); }).find("target id -3 at position 9"),
            std::string::npos);
}

// The end-to-end check: the demo recipe for 50 steps on both
// backends. Same data order, same masks, same schedule: each logged loss on
// CUDA within the chain bound of the CPU's, and the CUDA run learns (its last
// loss below its first by at least half the CPU's drop).
TEST(CudaModel, FiftyStepRunTracksTheCpu) {
  QLORA_REQUIRE_GPU();
  testing::ScratchDir d;
  const std::string recipe = std::string(QLORA_SOURCE_DIR) + "/recipes/demo.yaml";
  const std::string common = " train.max_steps=50 logging.every=1 train.eval_every=0 --no-samples";
  for (const char* backend : {"cpu", "cuda"}) {
    const auto r = testing::run_qlora("run " + recipe + " output.dir=" + (d / backend).string() +
                                      " device.backend=" + backend + common);
    ASSERT_EQ(r.status, 0) << r.output;
  }
  const MetricsHistory cpu = read_metrics(d / "cpu" / "metrics.jsonl");
  const MetricsHistory gpu = read_metrics(d / "cuda" / "metrics.jsonl");
  ASSERT_EQ(cpu.train.size(), 50u);
  ASSERT_EQ(gpu.train.size(), 50u);
  const int64_t layers = 4;  // builtin:tiny
  for (size_t i = 0; i < cpu.train.size(); ++i)
    EXPECT_LE(std::abs(gpu.train[i].loss - cpu.train[i].loss), chain_bound(layers) * cpu.train[i].loss)
        << "step " << i + 1;
  const double cpu_drop = cpu.train.front().loss - cpu.train.back().loss;
  EXPECT_GT(cpu_drop, 0.5);
  EXPECT_GT(gpu.train.front().loss - gpu.train.back().loss, 0.5 * cpu_drop);
}

#else

TEST(CudaModel, LossAndLoraGradientsTrackTheCpu) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, BadTokensAndTargetsAreNamed) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, FiftyStepRunTracksTheCpu) {
  QLORA_REQUIRE_GPU();
}

#endif

}  // namespace
}  // namespace qlora
