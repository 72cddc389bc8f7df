// The whole model on the GPU against the fp32 CPU reference: loss and LoRA
// gradients of builtin:tiny (4 layers, GQA, NF4 base), and a 50-step
// `qlora run` whose loss curve on CUDA tracks the CPU one; a Qwen3 model with
// a sliding-window layer. Skips without a GPU.
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

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "cuda_testing.h"
#include "model/builtin.h"
#include "model/llama.h"
#include "model/llama_generate.h"
#include "model/random_weights.h"
#include "model/weights.h"
#include "plan/cuda_constants.h"
#include "plan/plan.h"
#include "test_models.h"
#include "testing.h"
#include "tools/quantize_model.h"
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

using testing::rel_l2;

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

// Qwen3's per-head q/k norms (head_dim 16 != hidden 32 / 4 heads) and a
// sliding window of 5 on layer 1 of 2 (layer 0 full), random NF4 weights with
// q/k norm weights away from 1: the same bound as above.
TEST(CudaModel, Qwen3WithASlidingWindowTracksTheCpu) {
  QLORA_REQUIRE_GPU();
  ModelConfig cfg = testing::tiny_gqa_config(2);
  cfg.arch = Arch::Qwen3;
  cfg.model_type = "qwen3";
  cfg.qk_norm = true;
  cfg.head_dim = 16;
  cfg.sliding_window = 5;
  cfg.sliding_layers = {false, true};
  LlamaWeights w = random_llama_weights(cfg, WeightLoadOptions{}, 11, 0.1f);
  for (LlamaLayerWeights& lw : w.layers)
    for (const float* norm : {lw.q_norm, lw.k_norm}) {
      float* n = const_cast<float*>(norm);  // the arena's own memory
      for (int64_t d = 0; d < cfg.head_dim; ++d) n[d] = 1.0f + 0.25f * float((d * 5) % 7 - 3);
    }
  const int64_t B = 2, T = 40;
  const Batch batch = make_batch(B, T, cfg.vocab_size);
  LoraConfig lc;
  lc.rank = 4;
  LoraWeights lora = testing::random_lora(cfg, lc, 300, 0.05f);
  LlamaModel cpu(w, &lora, B, T);
  const double cpu_loss = cpu.forward(batch.view(B, T));
  cpu.backward();
  CudaContext ctx;
  CudaLlamaModel gpu(ctx, w, &lora, B, T);
  const double gpu_loss = gpu.forward(batch.view(B, T));
  gpu.backward();
  EXPECT_LE(std::abs(gpu_loss - cpu_loss), chain_bound(cfg.num_hidden_layers) * cpu_loss);
  std::vector<float> grads(lora.flat_size());
  gpu.download_grads(grads.data());
  const std::vector<float> want(lora.flat_grads(), lora.flat_grads() + lora.flat_size());
  EXPECT_LE(rel_l2(want, grads), chain_bound(cfg.num_hidden_layers));
}

// DoRA (kernels/cuda/dora_cuda.h in CudaLlamaModel) against the CPU model:
// random A and B (rank_pattern: down_proj at 4), magnitudes at the CPU's
// norms times 1 + 0.2 N(0,1) (so g != 1), with and without dropout and
// checkpointing. The same chain bound as LoRA: DoRA adds per linear one
// bf16 rounding of each product (base, lora) and of the scaled output, which
// stay within the 11 per layer counted for the linears' outputs and inputs
// (it replaces the LoRA branch's accumulation into the output); the norms are
// fp32 (at most a few 1e-6 relative off, DoraWeightNorm below). The
// magnitude gradients are checked alone too, so a wrong dm cannot hide
// behind the much larger A and B gradients.
LoraWeights dora_lora(const LlamaWeights& w, double dropout, unsigned seed) {
  LoraConfig lc;
  lc.rank = 8;
  lc.dora = true;
  lc.dropout = dropout;
  lc.seed = 7;
  lc.rank_pattern = {{"down_proj", 4}};
  LoraWeights lora = testing::random_lora(w.cfg, lc, seed, 0.05f);
  init_dora_magnitudes(lora, w);
  for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const int64_t out = lora_target_dims(w.cfg, LoraTarget(t)).second;
      const auto r = testing::randn(out, seed++, 0.2f);
      for (int64_t i = 0; i < out; ++i) lora.M(l, LoraTarget(t))[i] *= 1.0f + r[size_t(i)];
    }
  return lora;
}

// The magnitude entries of a flat LoRA array.
std::vector<float> magnitudes_of(const ModelConfig& cfg, const LoraWeights& lora, const std::vector<float>& flat) {
  std::vector<float> m;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!lora.has(LoraTarget(t))) continue;
      const size_t off = size_t(lora.M(l, LoraTarget(t)) - lora.flat_params());
      const size_t out = size_t(lora_target_dims(cfg, LoraTarget(t)).second);
      m.insert(m.end(), flat.begin() + long(off), flat.begin() + long(off + out));
    }
  return m;
}

TEST(CudaModel, DoraLossAndGradientsTrackTheCpu) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));
  const ModelConfig& cfg = w.cfg;
  const int64_t B = 2, T = 48;
  const Batch batch = make_batch(B, T, cfg.vocab_size);
  for (const double dropout : {0.0, 0.1})
    for (const bool checkpointing : {false, true}) {
      const std::string what = "dora, dropout " + std::to_string(dropout) + (checkpointing ? ", checkpointing" : "");
      LoraWeights lora = dora_lora(w, dropout, 100);
      LlamaRunOptions opt;
      opt.checkpointing = checkpointing;
      LlamaModel cpu(w, &lora, B, T, opt);
      const double cpu_loss = cpu.forward(batch.view(B, T));
      cpu.backward();

      CudaContext ctx;
      CudaLlamaModel gpu(ctx, w, &lora, B, T, opt);
      const double gpu_loss = gpu.forward(batch.view(B, T));
      gpu.backward();
      EXPECT_LE(std::abs(gpu_loss - cpu_loss), chain_bound(cfg.num_hidden_layers) * cpu_loss) << what;

      std::vector<float> grads(lora.flat_size());
      gpu.download_grads(grads.data());
      const std::vector<float> want(lora.flat_grads(), lora.flat_grads() + lora.flat_size());
      for (float g : grads) ASSERT_TRUE(std::isfinite(g)) << what;
      EXPECT_LE(rel_l2(want, grads), chain_bound(cfg.num_hidden_layers)) << what;
      const std::vector<float> dm_want = magnitudes_of(cfg, lora, want), dm_got = magnitudes_of(cfg, lora, grads);
      EXPECT_GT(rel_l2(std::vector<float>(dm_want.size(), 0.0f), dm_want), 0.0) << what << ": no dm to compare";
      EXPECT_LE(rel_l2(dm_want, dm_got), chain_bound(cfg.num_hidden_layers)) << what << " (magnitudes)";
    }
}

// CudaLlamaModel::init_dora_magnitudes (the GPU engine's initialisation) gives
// the CPU's init_dora_magnitudes within the fp32 bound of the kernel test
// (tests/test_cuda_ops.cpp, CudaOps.DoraWeightNorm...): 4 (R + 3) 2^-24 ||T_j||
// with T_jc = |W_jc| + s sum_r |B_jr A_rc|; A and B stay bit for bit.
TEST(CudaModel, DoraMagnitudesInitialiseAsTheCpu) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));
  LoraWeights cpu = dora_lora(w, 0.0, 300);
  CudaContext ctx;
  CudaLlamaModel gpu(ctx, w, &cpu, 1, 16);
  gpu.init_dora_magnitudes();
  init_dora_magnitudes(cpu, w);
  std::vector<float> got(cpu.flat_size());
  gpu.download_lora(got.data());
  const ModelConfig& cfg = w.cfg;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const LoraTarget tg = LoraTarget(t);
      const auto [in, out] = lora_target_dims(cfg, tg);
      const int64_t R = cpu.rank(l, tg);
      std::vector<float> W(size_t(in * out));
      ops::linear_rows_fp32(W.data(), w.layers[size_t(l)].linear(tg), 0, out);
      const float *A = cpu.A(l, tg), *Bm = cpu.B(l, tg), *M = cpu.M(l, tg);
      const size_t off = size_t(M - cpu.flat_params());
      for (int64_t j = 0; j < out; ++j) {
        double ss = 0.0;
        for (int64_t i = 0; i < in; ++i) {
          double v = std::abs(double(W[size_t(j * in + i)]));
          for (int64_t k = 0; k < R; ++k) v += std::abs(double(cpu.scale(l, tg)) * Bm[j * R + k] * A[k * in + i]);
          ss += v * v;
        }
        ASSERT_NEAR(got[off + size_t(j)], M[j], 4 * double(R + 3) * std::ldexp(std::sqrt(ss), -24))
            << lora_module_name(l, tg) << " row " << j;
      }
      EXPECT_EQ(std::memcmp(got.data() + (A - cpu.flat_params()), A, size_t(R * in) * sizeof(float)), 0);
      EXPECT_EQ(std::memcmp(got.data() + (Bm - cpu.flat_params()), Bm, size_t(out * R) * sizeof(float)), 0);
    }
}

// Generation (last_logits, what `qlora generate --device cuda` runs) with a
// DoRA adapter against the CPU generator (which folds g into B): the chain
// bound of the forward.
TEST(CudaModel, DoraGenerationTracksTheCpu) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));
  const LoraWeights lora = dora_lora(w, 0.1, 500);
  const int64_t T = 20, V = w.cfg.vocab_size;
  const Batch b = make_batch(1, T, V);
  std::vector<float> want(static_cast<size_t>(V)), got(static_cast<size_t>(V));
  LlamaGenerator cpu(w, &lora, T);
  cpu.feed(b.tokens.data(), T, want.data());
  CudaContext ctx;
  CudaLlamaModel gpu(ctx, w, &lora, 1, T);
  gpu.set_training(false);
  gpu.last_logits(b.tokens.data(), T, got.data());
  EXPECT_LE(rel_l2(want, got), chain_bound(w.cfg.num_hidden_layers));
}

// What DoRA adds to the GPU model's device bytes is what it adds to the plan's
// LoRA and activation lines (PlanCuda.DoraAddsItsMagnitudesNormsProductsAndPanel),
// exactly, up to the activation arena's 256-byte alignment of each new buffer
// (counted here from the same shapes).
TEST(CudaModel, DoraPlannedBytesAreTheAllocatedOnes) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));
  const ModelConfig& cfg = w.cfg;
  const int64_t B = 2, T = 48;
  for (const bool checkpointing : {false, true}) {
    SCOPED_TRACE(checkpointing ? "checkpointing" : "no checkpointing");
    LoraConfig lc;
    lc.rank = 8;
    lc.targets.fill(false);
    for (LoraTarget t : {LoraTarget::Q, LoraTarget::K, LoraTarget::Up}) lc.targets[size_t(t)] = true;
    const LoraWeights plain = testing::random_lora(cfg, lc, 1, 0.05f);
    lc.dora = true;
    const LoraWeights dora = testing::random_lora(cfg, lc, 1, 0.05f);
    LlamaRunOptions run;
    run.checkpointing = checkpointing;
    CudaContext ctx;
    CudaLlamaModel without(ctx, w, &plain, B, T, run), with(ctx, w, &dora, B, T, run);

    PlanInput in;
    in.model = cfg;
    in.backend = PlanBackend::cuda;
    in.lora = lc;
    in.lora.dora = false;
    in.micro_batch = B;
    in.seq_len = T;
    in.checkpointing = checkpointing;
    auto model_lines = [](const MemoryPlan& p) {
      uint64_t n = 0;
      for (const PlanBuffer& b : p.buffers)
        if (b.place == Place::device && (b.category == "LoRA" || b.category == "activations")) n += b.bytes;
      return n;
    };
    const uint64_t plan_without = model_lines(make_plan(in));
    in.lora.dora = true;
    const uint64_t plan_with = model_lines(make_plan(in));

    auto pad = [](uint64_t bytes) { return (256 - bytes % 256) % 256; };
    const uint64_t sets = checkpointing ? 1 : uint64_t(cfg.num_hidden_layers), N = uint64_t(B * T);
    const uint64_t wide = uint64_t(std::max({cfg.hidden_size, cfg.intermediate_size, cfg.q_dim()}));
    uint64_t padding = 2 * pad(N * wide * 2) + pad(uint64_t(plan_cuda::kDoraPanelRows) * wide * 4);
    for (LoraTarget t : {LoraTarget::Q, LoraTarget::K, LoraTarget::Up}) {
      const uint64_t out_bytes = uint64_t(lora_target_dims(cfg, t).second) * 4;
      padding += sets * pad(out_bytes);
      // The magnitude's 64-byte alignment in the flat LoRA arrays (fp32 master
      // and gradient, bf16 copy: 10 bytes per float slot).
      padding += uint64_t(cfg.num_hidden_layers) * ((64 - out_bytes % 64) % 64) / 4 * 10;
    }
    EXPECT_EQ(uint64_t(with.device_bytes() - without.device_bytes()), plan_with - plan_without + padding);
    EXPECT_EQ(with.weight_bytes(), without.weight_bytes());
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

uint64_t plan_bytes(const MemoryPlan& p, const std::string& name) {
  for (const PlanBuffer& b : p.buffers)
    if (b.name == name) return b.bytes;
  ADD_FAILURE() << "no buffer named " << name;
  return 0;
}

// The GPU keeps double-quantized scales in their small form (8-bit codes +
// second level) and decodes each one with double_dequantize's fp32 operations
// (two roundings, no FMA): bit for bit the CPU's fp32 absmax. So the model on
// the kept form gives exactly (EXPECT_EQ, not a threshold) the loss and LoRA
// gradients of the same model given the fp32 scales, and it holds fewer
// weight bytes by exactly the difference of the plan's scale lines.
TEST(CudaModel, NestedScalesGiveTheLossOfFp32ScalesAndThePlannedBytes) {
  QLORA_REQUIRE_GPU();
  const LlamaWeights w = load_llama_weights(resolve_model_path("builtin:tiny"));  // NF4 + double quant
  const ModelConfig& cfg = w.cfg;
  // The same weights with the fp32 scales only (views into w's arena).
  LlamaWeights plain;
  plain.cfg = cfg;
  plain.embed = w.embed;
  plain.lm_head = w.lm_head;
  plain.final_norm = w.final_norm;
  plain.layers = w.layers;
  plain.quantized = true;
  for (LlamaLayerWeights& L : plain.layers)
    for (ops::LinearWeight* lw : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) {
      ASSERT_TRUE(lw->double_quant());
      lw->absmax8 = nullptr;
      lw->nested_absmax = nullptr;
      lw->code8 = nullptr;
    }
  const int64_t B = 2, T = 48;
  const Batch batch = make_batch(B, T, cfg.vocab_size);
  LoraConfig lc;
  lc.rank = 8;
  lc.dropout = 0.1;
  lc.seed = 5;
  LoraWeights lora = testing::random_lora(cfg, lc, 200, 0.05f);

  CudaContext ctx;
  CudaLlamaModel nested(ctx, w, &lora, B, T), fp32(ctx, plain, &lora, B, T);
  const double loss_nested = nested.forward(batch.view(B, T));
  nested.backward();
  const double loss_fp32 = fp32.forward(batch.view(B, T));
  fp32.backward();
  ASSERT_TRUE(std::isfinite(loss_nested));
  EXPECT_EQ(loss_nested, loss_fp32);
  std::vector<float> g_nested(lora.flat_size()), g_fp32(lora.flat_size());
  nested.download_grads(g_nested.data());
  fp32.download_grads(g_fp32.data());
  EXPECT_EQ(std::memcmp(g_nested.data(), g_fp32.data(), g_nested.size() * sizeof(float)), 0);

  // Same activations, LoRA and op workspace (one context): the difference of
  // the device bytes is the difference of the scales alone.
  PlanInput in;
  in.model = cfg;
  in.backend = PlanBackend::cuda;
  in.lora = lc;
  in.micro_batch = B;
  in.seq_len = T;
  const MemoryPlan with_dq = make_plan(in);
  in.double_quant = false;
  const MemoryPlan without = make_plan(in);
  const uint64_t planned = plan_bytes(without, "absmax") -
                           plan_bytes(with_dq, "absmax, 8-bit (double quant)") -
                           plan_bytes(with_dq, "second-level scales + code");
  EXPECT_EQ(uint64_t(fp32.device_bytes() - nested.device_bytes()), planned);
  // And in absolute terms: the weights on the device are the plan's base-weight lines, byte for byte.
  for (const auto& [model, plan] : {std::pair<const CudaLlamaModel*, const MemoryPlan*>{&nested, &with_dq},
                                    {&fp32, &without}}) {
    uint64_t base = 0;
    for (const PlanBuffer& b : plan->buffers)
      if (b.category == "base weights") base += b.bytes;
    EXPECT_EQ(model->weight_bytes(), base);
  }
}

// Streamed from the folder (no host copy of the model) the GPU holds exactly
// what the model built from load_llama_weights of the same folder uploads:
// the same conversions of the same values, so the same loss and LoRA
// gradients bit for bit (EXPECT_EQ: identical inputs, identical kernels, one
// context) and the same weight bytes. Quantize-on-load NF4 with and without
// double quantization, dense (bf16 on the device), FP4, and a bitsandbytes
// checkpoint (its own nested state kept).
TEST(CudaModel, StreamedWeightsGiveTheModelOfTheLoadedOnes) {
  QLORA_REQUIRE_GPU();
  testing::ScratchDir d;
  const std::filesystem::path tiny = resolve_model_path("builtin:tiny");
  quantize_model(tiny, d / "bnb", {});
  struct Case {
    const char* what;
    std::filesystem::path dir;
    WeightLoadOptions opt;
  };
  WeightLoadOptions no_dq, dense, fp4;
  no_dq.double_quant = false;
  dense.quantize = false;
  fp4.type = Quant4Type::FP4;
  fp4.block = 128;
  const Case cases[] = {{"nf4 + double quant", tiny, {}}, {"nf4, fp32 scales", tiny, no_dq},
                        {"dense", tiny, dense},         {"fp4 block 128", tiny, fp4},
                        {"bitsandbytes", d / "bnb", {}}};
  const int64_t B = 2, T = 48;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    const LlamaWeights w = load_llama_weights(c.dir, c.opt);
    const ModelConfig& cfg = w.cfg;
    const Batch batch = make_batch(B, T, cfg.vocab_size);
    LoraConfig lc;
    lc.rank = 8;
    lc.dropout = 0.1;
    lc.seed = 3;
    LoraWeights lora = testing::random_lora(cfg, lc, 300, 0.05f);
    LlamaRunOptions run;
    run.checkpointing = true;

    CudaContext ctx;
    CudaLlamaModel loaded(ctx, w, &lora, B, T, run), streamed(ctx, c.dir, c.opt, &lora, B, T, run);
    EXPECT_EQ(streamed.weight_bytes(), loaded.weight_bytes());
    EXPECT_EQ(streamed.device_bytes(), loaded.device_bytes());
    const double loss_loaded = loaded.forward(batch.view(B, T));
    loaded.backward();
    const double loss_streamed = streamed.forward(batch.view(B, T));
    streamed.backward();
    ASSERT_TRUE(std::isfinite(loss_loaded));
    EXPECT_EQ(loss_streamed, loss_loaded);
    std::vector<float> g_loaded(lora.flat_size()), g_streamed(lora.flat_size());
    loaded.download_grads(g_loaded.data());
    streamed.download_grads(g_streamed.data());
    EXPECT_EQ(std::memcmp(g_loaded.data(), g_streamed.data(), g_loaded.size() * sizeof(float)), 0);
  }

  // A folder that is not a model fails with load_llama_weights' error.
  CudaContext ctx;
  const std::string want = testing::error_of([&] { (void)load_llama_weights(d.path()); });
  EXPECT_FALSE(want.empty());
  EXPECT_EQ(testing::error_of([&] { CudaLlamaModel m(ctx, d.path(), {}, nullptr, 1, 16); }), want);
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
TEST(CudaModel, Qwen3WithASlidingWindowTracksTheCpu) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, BadTokensAndTargetsAreNamed) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, FiftyStepRunTracksTheCpu) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, NestedScalesGiveTheLossOfFp32ScalesAndThePlannedBytes) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, DoraLossAndGradientsTrackTheCpu) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, DoraMagnitudesInitialiseAsTheCpu) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, DoraGenerationTracksTheCpu) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, DoraPlannedBytesAreTheAllocatedOnes) {
  QLORA_REQUIRE_GPU();
}
TEST(CudaModel, StreamedWeightsGiveTheModelOfTheLoadedOnes) {
  QLORA_REQUIRE_GPU();
}

#endif

}  // namespace
}  // namespace qlora
