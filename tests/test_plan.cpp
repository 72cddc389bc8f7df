// The memory planner: CPU plans equal the arenas a run allocates (builtin:tiny
// and stories260K in several configurations), CUDA plans against the
// literature, presets against published parameter counts, advice, bad input,
// and `qlora estimate` end to end. "GB" in the literature checks is 1e9 bytes
// (the papers' and vendors' unit); GiB is 2^30.
#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/builtin.h"
#include "model/tensor_table.h"
#include "model/weights.h"
#include "plan/cuda_constants.h"
#include "plan/plan.h"
#include "testing.h"
#include "tools/quantize_model.h"

namespace qlora {
namespace {

using testing::CliResult;
using testing::error_of;
using testing::run_qlora;
using testing::ScratchDir;

constexpr double kGB = 1e9;
constexpr uint64_t kGiB = uint64_t(1) << 30;

PlanInput cuda_input(const std::string& preset, int64_t rank, int64_t batch, int64_t seq, OptimizerKind opt,
                     const std::string& gpu) {
  PlanInput in;
  in.model = preset_config(preset);
  in.model_name = preset;
  in.backend = PlanBackend::cuda;
  in.lora.rank = rank;
  in.lora.dropout = 0.05;
  in.micro_batch = batch;
  in.seq_len = seq;
  in.optimizer.kind = opt;
  in.budget_bytes = gpu_memory_bytes(gpu);
  return in;
}

uint64_t bytes_of(const MemoryPlan& p, const std::string& name) {
  for (const PlanBuffer& b : p.buffers)
    if (b.name == name) return b.bytes;
  ADD_FAILURE() << "no buffer named " << name;
  return 0;
}

// One CPU configuration: plan it, then build the run's objects with the
// options the plan hands out, run a forward + backward + optimizer step, and
// compare every arena.
struct CpuCase {
  int64_t B, T;
  bool checkpointing;
  int64_t rank;
  std::vector<LoraTarget> targets;  // empty: all
  bool quantize;
  OptimizerKind optimizer;
  double momentum = 0.0;
  bool dora = false;
  std::vector<std::pair<std::string, int64_t>> rank_pattern = {};
  double plus_lr_ratio = 1.0;
};

void check_cpu_case(const std::filesystem::path& dir, const CpuCase& c) {
  PlanInput in;
  in.model = load_model_config(dir);
  in.backend = PlanBackend::cpu;
  in.micro_batch = c.B;
  in.seq_len = c.T;
  in.checkpointing = c.checkpointing;
  in.lora.rank = c.rank;
  in.lora.dropout = 0.1;
  if (!c.targets.empty()) {
    in.lora.targets.fill(false);
    for (LoraTarget t : c.targets) in.lora.targets[size_t(t)] = true;
  }
  in.quantize = c.quantize;
  in.optimizer.kind = c.optimizer;
  in.optimizer.momentum = c.momentum;
  in.lora.dora = c.dora;
  in.lora.rank_pattern = c.rank_pattern;
  in.optimizer.plus_lr_ratio = c.plus_lr_ratio;
  apply_checkpoint_quant(in, dir);
  const MemoryPlan plan = make_plan(in);
  SCOPED_TRACE(plan_table(plan));

  const LlamaWeights w = load_llama_weights(dir, weight_load_options(in));
  LoraWeights lora(w.cfg, in.lora);
  lora.init_default(1);
  init_dora_magnitudes(lora, w);
  LlamaModel model(w, &lora, c.B, c.T, llama_run_options(in));
  Optimizer opt(in.optimizer, lora.flat_size(), lora.plus_ranges());
  EXPECT_EQ(plan.lora_params, lora.num_params());

  std::vector<int32_t> tokens(size_t(c.B * c.T)), targets(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = int32_t((i * 7 + 3) % size_t(w.cfg.vocab_size));
    targets[i] = int32_t((i * 5 + 1) % size_t(w.cfg.vocab_size));
  }
  LlamaBatch batch;
  batch.tokens = tokens.data();
  batch.targets = targets.data();
  batch.B = c.B;
  batch.T = c.T;
  const double loss = model.forward(batch);
  EXPECT_TRUE(std::isfinite(loss));
  model.backward();
  opt.step(lora.flat_params(), lora.flat_grads(), 1e-3);

  const CpuArenas measured{w.arena.capacity(), lora.params_bytes(), lora.grads_bytes(), opt.state_bytes(),
                           model.activation_bytes()};
  EXPECT_EQ(plan.arenas.weights, measured.weights);
  EXPECT_EQ(plan.arenas.lora_params, measured.lora_params);
  EXPECT_EQ(plan.arenas.lora_grads, measured.lora_grads);
  EXPECT_EQ(plan.arenas.optimizer, measured.optimizer);
  EXPECT_EQ(plan.arenas.activations, measured.activations);
  EXPECT_GT(measured.activations, 0u);
  EXPECT_NE(plan_vs_measured_text(plan, measured).find("total"), std::string::npos);
  // The arena rows of the table are those figures.
  EXPECT_EQ(bytes_of(plan, "base weights arena"), measured.weights);
  EXPECT_EQ(bytes_of(plan, "activation arena"), measured.activations);
  EXPECT_GE(plan.device_bytes, measured.total());
}

std::vector<CpuCase> cpu_cases() {
  using T = LoraTarget;
  return {
      {1, 16, true, 8, {}, true, OptimizerKind::adamw},
      {2, 32, false, 8, {}, true, OptimizerKind::adamw},
      {3, 24, true, 4, {T::Q, T::V}, true, OptimizerKind::paged_adamw},
      {1, 64, false, 16, {T::Gate, T::Up, T::Down}, false, OptimizerKind::sgd, 0.9},
      {2, 8, true, 2, {T::O}, false, OptimizerKind::sgd, 0.0},
      // DoRA (magnitudes, norms, product buffers), per-module ranks, LoRA+
      {2, 16, true, 4, {}, true, OptimizerKind::adamw, 0.0, true, {{"down_proj", 2}, {"q_proj", 8}}, 16.0},
      {1, 16, false, 4, {T::Q, T::Down}, false, OptimizerKind::paged_adamw, 0.0, true, {}, 1.0},
      {1, 8, false, 8, {}, true, OptimizerKind::sgd, 0.9, false, {{"layers.0.mlp.up_proj", 1}}, 4.0},
  };
}

TEST(PlanCpu, ArenasEqualTheAllocationsOfABuiltinTinyRun) {
  ScratchDir d;
  write_builtin_model("tiny", d / "tiny");
  for (const CpuCase& c : cpu_cases()) {
    SCOPED_TRACE(::testing::Message()
                 << "B " << c.B << " T " << c.T << " ckpt " << c.checkpointing << " r " << c.rank);
    check_cpu_case(d / "tiny", c);
  }
}

TEST(PlanCpu, ArenasEqualTheAllocationsOfAStories260KRun) {
  QLORA_REQUIRE_FIXTURES(fx);
  for (const CpuCase& c : cpu_cases()) {
    SCOPED_TRACE(::testing::Message()
                 << "B " << c.B << " T " << c.T << " ckpt " << c.checkpointing << " r " << c.rank);
    check_cpu_case(fx / "models/stories260K/hf", c);
  }
}

// Qwen3 (q/k norm activations) with a sliding-window layer, and Mistral with a
// window on every layer (the window-start row): the tiny models of
// tests/reference/make_model_golden_hf.py as HF folders.
TEST(PlanCpu, ArenasEqualTheAllocationsOfQwen3AndWindowedRuns) {
  for (const char* file : {"model_golden_qwen3_window.safetensors", "model_golden_mistral_window.safetensors"}) {
    SCOPED_TRACE(file);
    const SafetensorsFile g(std::string(QLORA_SOURCE_DIR) + "/tests/reference/" + file);
    ScratchDir d;
    std::vector<OwnedTensor> ts;
    for (const TensorInfo& t : g.tensors()) {
      if (t.name.rfind("model.", 0) != 0 && t.name != "lm_head.weight") continue;
      const auto bytes = g.data(t);
      ts.push_back({t.name, t.dtype, t.shape, std::vector<uint8_t>(bytes.begin(), bytes.end())});
    }
    save_safetensors(d / "model.safetensors", ts);
    testing::write_bytes(d / "config.json", g.metadata().at("config"));
    ASSERT_TRUE(load_model_config(d.path()).sliding_window.has_value());
    for (const CpuCase& c : cpu_cases()) check_cpu_case(d.path(), c);
  }
}

// A bitsandbytes 4-bit checkpoint: the block comes from its files, and the
// plan still equals what load_llama_weights allocates.
TEST(PlanCpu, FourBitCheckpointIsReadFromTheHeaders) {
  ScratchDir d;
  write_builtin_model("tiny", d / "tiny");
  QuantizeOptions q;
  q.block = 128;
  quantize_model(d / "tiny", d / "q", q);
  PlanInput in;
  in.model = load_model_config(d / "q");
  apply_checkpoint_quant(in, d / "q");
  EXPECT_TRUE(in.prequantized);
  EXPECT_EQ(in.block, 128);
  EXPECT_TRUE(in.double_quant);
  check_cpu_case(d / "q", {1, 16, true, 8, {}, true, OptimizerKind::adamw});
  PlanInput plain;
  apply_checkpoint_quant(plain, d / "tiny");
  EXPECT_FALSE(plain.prequantized);
}

// QLoRA paper (Dettmers et al. 2023): LLaMA-65B, r 64 on all linear layers,
// batch 1, seq 512, paged AdamW, fits a 48 GB card.
TEST(PlanLiterature, Llama65bAsInTheQloraPaperFitsA48GBCard) {
  const MemoryPlan p = make_plan(cuda_input("llama-1-65b", 64, 1, 512, OptimizerKind::paged_adamw, "a6000"));
  SCOPED_TRACE(plan_table(p));
  EXPECT_GE(double(p.device_bytes), 41 * kGB);
  EXPECT_LE(double(p.device_bytes), 48 * kGB);
  EXPECT_TRUE(p.verdict == Verdict::fits || p.verdict == Verdict::fits_with_paging)
      << verdict_name(p.verdict);
  // The NF4 codes alone: half a byte per block-linear weight,
  // 80 x (4 x 8192^2 + 3 x 8192 x 22016) = 64.76e9 of them.
  EXPECT_NEAR(double(bytes_of(p, "nf4 codes")), 32.38 * kGB, 0.01 * kGB);
  // Paged: m and v live in pinned host memory.
  EXPECT_GT(p.pinned_host_bytes, 8 * p.lora_params);
}

TEST(PlanLiterature, Llama31_8bAtSeq2048Fits24GB) {
  for (int64_t rank : {16, 64}) {
    const MemoryPlan p =
        make_plan(cuda_input("llama-3.1-8b", rank, 1, 2048, OptimizerKind::adamw, "rtx4090"));
    SCOPED_TRACE(plan_table(p));
    EXPECT_EQ(p.verdict, Verdict::fits);
    EXPECT_LT(p.device_bytes, 24 * kGiB);
    EXPECT_GT(double(p.device_bytes), 5 * kGB);  // 4-bit weights + bf16 embeddings alone are ~5.6 GB
  }
}

// Chunked loss: neither model counts full-vocabulary logits. Doubling the
// vocabulary changes only the embeddings and lm_head (and the allocator's
// share of them), never activations or workspaces.
TEST(PlanLiterature, FullVocabularyLogitsAreNeverCounted) {
  PlanInput in = cuda_input("llama-3.1-8b", 16, 2, 2048, OptimizerKind::adamw, "h100-80");
  const uint64_t full_logits = uint64_t(in.micro_batch * in.seq_len * in.model.vocab_size) * 4;
  const MemoryPlan a = make_plan(in);
  EXPECT_LT(bytes_of(a, "cross-entropy chunk") * 10, full_logits);
  for (const PlanBuffer& b : a.buffers)
    if (b.lifetime == Lifetime::per_layer || b.lifetime == Lifetime::per_chunk) {
      EXPECT_LT(b.bytes, full_logits / 2) << b.name;
    }
  PlanInput big = in;
  big.model.vocab_size *= 2;
  const MemoryPlan b = make_plan(big);
  auto sum = [](const MemoryPlan& p, const std::string& cat) {
    uint64_t s = 0;
    for (const PlanBuffer& x : p.buffers) s += x.category == cat ? x.bytes : 0;
    return s;
  };
  EXPECT_EQ(sum(a, "activations"), sum(b, "activations"));
  EXPECT_EQ(sum(a, "workspace"), sum(b, "workspace"));
  // CPU: the activation arena does not grow with the vocabulary either.
  ModelConfig c = preset_config("llama-2-7b");
  const size_t act = LlamaModel::arena_bytes(c, nullptr, 1, 512);
  c.vocab_size *= 4;
  EXPECT_EQ(LlamaModel::arena_bytes(c, nullptr, 1, 512), act);
}

TEST(PlanCuda, SwitchesMoveMemoryTheWayTheyShould) {
  const PlanInput in = cuda_input("llama-2-13b", 64, 4, 2048, OptimizerKind::adamw, "a100-40");
  const MemoryPlan base = make_plan(in);
  PlanInput x = in;
  x.checkpointing = false;
  EXPECT_GT(make_plan(x).device_bytes, base.device_bytes + 10 * kGiB);  // 40 layers of saved activations
  x = in;
  x.optimizer.kind = OptimizerKind::paged_adamw;
  const MemoryPlan paged = make_plan(x);
  EXPECT_LT(paged.device_bytes, base.device_bytes);
  EXPECT_GT(paged.pinned_host_bytes, base.pinned_host_bytes);
  x = in;
  x.double_quant = false;
  // Double quantization saves ~0.373 bits per weight (fp32 -> 8-bit absmax + second level).
  const double params = double(bytes_of(base, "nf4 codes")) * 2;
  EXPECT_NEAR(double(make_plan(x).device_bytes - base.device_bytes) * 8 / params, 0.373, 0.02);
}

// train.checkpointing: auto. Budgets placed by the plan's own figures: the
// run without recomputation is chosen exactly when it fits in
// kAutoCheckpointingShare of the budget; without a budget, recomputation
// stays on; a budget too small even for the checkpointed run is refused as
// with checkpointing: true (the switch advice is left out: auto has chosen).
TEST(PlanCuda, AutoCheckpointingRecomputesOnlyWhenTheBudgetDemands) {
  PlanInput in = cuda_input("llama-2-13b", 64, 4, 2048, OptimizerKind::adamw, "a100-80");
  in.checkpointing = false;
  const uint64_t without = make_plan(in).device_bytes;
  in.checkpointing = true;
  const uint64_t with = make_plan(in).device_bytes;
  ASSERT_GT(without, with + kGiB);
  in.checkpointing_auto = true;
  in.checkpointing = true;  // ignored under auto
  auto chosen = [&](uint64_t budget) {
    PlanInput x = in;
    x.budget_bytes = budget;
    const MemoryPlan p = make_plan(x);
    EXPECT_TRUE(p.input.checkpointing_auto);
    return p;
  };
  const uint64_t edge = uint64_t(std::ceil(double(without) / kAutoCheckpointingShare));
  EXPECT_FALSE(chosen(edge).input.checkpointing);
  EXPECT_EQ(chosen(edge).device_bytes, without);
  EXPECT_EQ(chosen(edge).verdict, Verdict::fits);
  EXPECT_TRUE(chosen(edge - 1024).input.checkpointing);
  EXPECT_EQ(chosen(edge - 1024).device_bytes, with);
  EXPECT_TRUE(chosen(without).input.checkpointing);  // fits, but with less than the margin to spare
  EXPECT_TRUE(chosen(0).input.checkpointing);
  EXPECT_EQ(chosen(0).verdict, Verdict::no_budget);
  const MemoryPlan tight = chosen(with - 1);
  EXPECT_TRUE(tight.input.checkpointing);
  EXPECT_EQ(tight.verdict, Verdict::does_not_fit);
  PlanInput x = in;
  x.budget_bytes = with - 1;
  for (const PlanSwitch& sw : make_advice(x).switches) EXPECT_NE(sw.name, "checkpointing");
  EXPECT_NE(plan_table(tight).find("checkpointing on (auto)"), std::string::npos) << plan_table(tight);
  EXPECT_EQ(plan_json(chosen(edge)).at("settings").at("checkpointing"), false);
  EXPECT_EQ(plan_json(chosen(edge)).at("settings").at("checkpointing_auto"), true);
}

// The lines the GPU's own allocations must match, each against its formula
// from the config (not a copied number): LoRA gradients fp32 (CudaLlamaModel
// keeps them fp32), the paged optimizer's two device page slots of m and v
// (PagedAdamState, page size from plan/cuda_constants.h), and the block
// scales as CudaLlamaModel uploads them (8-bit codes + per tensor fp32 per 256
// blocks + the 256-entry code book; fp32 per block without double quant).
TEST(PlanCuda, LoraGradientsPagedSlotsAndScalesAsTheGpuHoldsThem) {
  struct Case {
    const char* preset;
    int64_t rank;
    bool q_only;  // few enough parameters for one page smaller than the page size
  };
  for (const Case& k :
       {Case{"llama-3.1-8b", 1, true}, Case{"llama-3.1-8b", 16, false}, Case{"llama-2-70b", 64, false}}) {
    SCOPED_TRACE(std::string(k.preset) + " r " + std::to_string(k.rank));
    PlanInput in = cuda_input(k.preset, k.rank, 1, 512, OptimizerKind::paged_adamw, "h200-141");
    if (k.q_only) in.lora.targets = {true, false, false, false, false, false, false};
    const ModelConfig& c = in.model;
    uint64_t P = 0;
    for (int t = 0; t < kNumLoraTargets; ++t)
      if (in.lora.targets[size_t(t)]) {
        const auto [d_in, d_out] = lora_target_dims(c, LoraTarget(t));
        P += uint64_t(k.rank) * uint64_t(d_in + d_out);
      }
    P *= uint64_t(c.num_hidden_layers);
    const MemoryPlan p = make_plan(in);
    SCOPED_TRACE(plan_table(p));
    EXPECT_EQ(bytes_of(p, "LoRA gradients"), 4 * P);
    const uint64_t page = std::min<uint64_t>(P, uint64_t(plan_cuda::kPagedOptimizerPageParams));
    EXPECT_EQ(k.q_only, page == P);
    EXPECT_EQ(bytes_of(p, "paged_adamw state (two pages on the device)"), 2 * 2 * page * 4);
    EXPECT_EQ(bytes_of(p, "paged_adamw state (paged out)"), 2 * P * 4);

    uint64_t blocks = 0, nested = 0;
    for (const TensorSlot& s : expected_tensors(c)) {
      if (!s.is_block_linear) continue;
      const uint64_t b = (uint64_t(shape_numel(s.shape)) + 63) / 64;
      blocks += b;
      nested += (b + 255) / 256 * 4 + 256 * 4;
    }
    EXPECT_EQ(bytes_of(p, "absmax, 8-bit (double quant)"), blocks);
    EXPECT_EQ(bytes_of(p, "second-level scales + code"), nested);
    PlanInput plain = in;
    plain.double_quant = false;
    EXPECT_EQ(bytes_of(make_plan(plain), "absmax"), 4 * blocks);

    // Host RAM during the load: the weights stream to the device, so no host
    // copy of the model, only one tensor in flight: the largest as fp32 plus
    // the form it is uploaded in (4-bit codes, fp32 scales and the
    // double-quantized form; a bf16 copy when dense).
    for (const PlanBuffer& b : p.buffers) EXPECT_NE(b.name, "base weights, host copy at load");
    uint64_t in_flight = 0;
    for (const TensorSlot& s : expected_tensors(c)) {
      const uint64_t n = uint64_t(shape_numel(s.shape));
      const uint64_t b = (n + 63) / 64;
      const uint64_t form = s.is_block_linear ? (n + 1) / 2 + 4 * b + b + (b + 255) / 256 * 4 + 256 * 4 : 2 * n;
      in_flight = std::max(in_flight, 4 * n + form);
    }
    // The embedding (V x C, dense) is the largest tensor of these models.
    EXPECT_EQ(in_flight, uint64_t(c.vocab_size * c.hidden_size) * 6);
    EXPECT_EQ(bytes_of(p, "weight load: one tensor in flight"), in_flight);
    EXPECT_LT(p.host_bytes, base_weight_arena_bytes(c, weight_load_options(in)));
  }
}

// Each preset against the published parameter count of its model card, and
// the planner's own validation errors.
TEST(PlanPresets, MatchPublishedParameterCounts) {
  const std::vector<std::pair<std::string, double>> published = {
      {"llama-1-65b", 65.29e9}, {"llama-2-7b", 6.74e9},   {"llama-2-13b", 13.02e9},
      {"llama-2-70b", 68.98e9}, {"llama-3.1-8b", 8.03e9}, {"llama-3.1-70b", 70.55e9},
      {"mistral-7b", 7.24e9},   {"qwen2.5-7b", 7.62e9},   {"qwen2.5-14b", 14.77e9},
      {"qwen2.5-32b", 32.76e9}, {"qwen2.5-72b", 72.71e9}};
  const size_t qwen3_presets = 6;  // PlanPresets.Qwen3MatchTheirModelCards
  EXPECT_EQ(preset_names().size(), published.size() + qwen3_presets);
  for (const auto& [name, count] : published) {
    double n = 0;
    for (const TensorSlot& s : expected_tensors(preset_config(name))) n += double(shape_numel(s.shape));
    EXPECT_NEAR(n / count, 1.0, 0.005) << name << ": " << n;
  }
  EXPECT_EQ(preset_config("llama-3.1-8b").rope_scaling.type, RopeScalingType::Llama3);
  const std::string e = error_of([] { preset_config("llama-4-400b"); });
  EXPECT_NE(e.find("llama-4-400b"), std::string::npos) << e;
  EXPECT_NE(e.find("qwen2.5-72b"), std::string::npos) << e;
}

// Qwen3's model cards (huggingface.co/Qwen/Qwen3-*) print the parameter
// count and the non-embedding count rounded to 0.1B (0.01B for 0.44B and
// 6.95B): each preset must fall within half a unit of the last digit.
TEST(PlanPresets, Qwen3MatchTheirModelCards) {
  struct Card {
    const char* name;
    double total, total_unit, non_embedding, non_embedding_unit;
  };
  const Card cards[] = {{"qwen3-0.6b", 0.6e9, 0.1e9, 0.44e9, 0.01e9}, {"qwen3-1.7b", 1.7e9, 0.1e9, 1.4e9, 0.1e9},
                        {"qwen3-4b", 4.0e9, 0.1e9, 3.6e9, 0.1e9},     {"qwen3-8b", 8.2e9, 0.1e9, 6.95e9, 0.01e9},
                        {"qwen3-14b", 14.8e9, 0.1e9, 13.2e9, 0.1e9},  {"qwen3-32b", 32.8e9, 0.1e9, 31.2e9, 0.1e9}};
  for (const Card& card : cards) {
    const ModelConfig c = preset_config(card.name);
    EXPECT_EQ(c.arch, Arch::Qwen3) << card.name;
    EXPECT_TRUE(c.qk_norm) << card.name;
    EXPECT_EQ(c.head_dim, 128) << card.name;
    EXPECT_FALSE(c.sliding_window.has_value()) << card.name;
    double total = 0, embedding = 0;
    for (const TensorSlot& s : expected_tensors(c)) {
      total += double(shape_numel(s.shape));
      if (s.kind == TensorKind::Embed || s.kind == TensorKind::LmHead) embedding += double(shape_numel(s.shape));
    }
    EXPECT_NEAR(total, card.total, card.total_unit / 2) << card.name;
    EXPECT_NEAR(total - embedding, card.non_embedding, card.non_embedding_unit / 2) << card.name;
  }
  // Tied embeddings in the small ones only.
  EXPECT_TRUE(preset_config("qwen3-4b").tie_word_embeddings);
  EXPECT_FALSE(preset_config("qwen3-8b").tie_word_embeddings);
}

TEST(PlanGpu, NamesAndSizes) {
  EXPECT_EQ(gpu_memory_bytes("rtx4090"), 24 * kGiB);
  EXPECT_EQ(gpu_memory_bytes("RTX3090"), 24 * kGiB);
  EXPECT_EQ(gpu_memory_bytes("l40s"), 48 * kGiB);
  EXPECT_EQ(gpu_memory_bytes("a100-80"), 80 * kGiB);
  EXPECT_EQ(gpu_memory_bytes("h200-141"), 141000000000ull);
  EXPECT_EQ(gpu_memory_bytes("48GB"), 48000000000ull);
  EXPECT_EQ(gpu_memory_bytes("24GiB"), 24 * kGiB);
  const std::string e = error_of([] { gpu_memory_bytes("voodoo2"); });
  EXPECT_NE(e.find("voodoo2"), std::string::npos) << e;
  EXPECT_NE(e.find("h100-80"), std::string::npos) << e;
  EXPECT_GT(host_memory_bytes(), 0u);
}

TEST(PlanValidation, ImpossibleSettingsNameTheKey) {
  PlanInput in = cuda_input("llama-3.1-8b", 16, 1, 2048, OptimizerKind::adamw, "rtx4090");
  in.lora.rank = 1025;  // k_proj is [4096 -> 1024]
  std::string e = error_of([&] { make_plan(in); });
  EXPECT_NE(e.find("lora.rank"), std::string::npos) << e;
  EXPECT_NE(e.find("k_proj"), std::string::npos) << e;
  in.lora.targets = {true, false, false, false, false, false, false};  // q_proj only: 4096 x 4096
  EXPECT_NO_THROW(make_plan(in));
  in = cuda_input("llama-2-7b", 16, 1, 4097, OptimizerKind::adamw, "rtx4090");
  e = error_of([&] { make_plan(in); });
  EXPECT_NE(e.find("data.seq_len"), std::string::npos) << e;
  EXPECT_NE(e.find("4096"), std::string::npos) << e;
  in.seq_len = 4096;
  EXPECT_NO_THROW(make_plan(in));
  // Mistral-7B (v0.1) attends within a 4096-token sliding window: rows longer
  // than the window are planned like any other (the window changes no buffer),
  // and the advice is bounded by memory and max_position_embeddings only.
  PlanInput m = cuda_input("mistral-7b", 16, 1, 4097, OptimizerKind::adamw, "a100-80");
  EXPECT_NO_THROW(make_plan(m));
  m.seq_len = 4096;
  EXPECT_GT(make_advice(m).max_seq_len, 4096);
  in.micro_batch = 0;
  e = error_of([&] { make_plan(in); });
  EXPECT_NE(e.find("train.micro_batch"), std::string::npos) << e;
  in.micro_batch = 1;
  // Patterns are checked against the model: a key matching no module, a rank
  // too large for the module it names.
  in.lora.rank_pattern = {{"down_prj", 8}};
  e = error_of([&] { make_plan(in); });
  EXPECT_NE(e.find("lora.rank_pattern key 'down_prj' matches no module of this model"), std::string::npos) << e;
  in.lora.rank_pattern = {{"layers.3.self_attn.k_proj", 8192}};
  e = error_of([&] { make_plan(in); });
  EXPECT_NE(e.find("lora.rank_pattern: 8192 is larger than the smaller dimension (4096) of "
                   "model.layers.3.self_attn.k_proj"),
            std::string::npos)
      << e;
  in.lora.rank_pattern = {{"down_proj", 4}};
  const uint64_t rank16 = make_plan(cuda_input("llama-2-7b", 16, 1, 4096, OptimizerKind::adamw, "rtx4090")).lora_params;
  EXPECT_EQ(make_plan(in).lora_params, rank16 - uint64_t(32) * 12 * (11008 + 4096));  // down_proj at 4, not 16
  in.lora.rank_pattern = {};
}

// DoRA on CUDA (kernels/cuda/dora_cuda.h, CudaLlamaModel): what it adds to the
// plan is exactly what the GPU model allocates for it (the model's side of
// this is CudaModel.DoraPlannedBytesAreTheAllocatedOnes): a magnitude (OUT)
// per adapted linear in every LoRA array, each linear's row norms (fp32) in
// every saved layer set, and the two product buffers and the norm panel.
TEST(PlanCuda, DoraAddsItsMagnitudesNormsProductsAndPanel) {
  for (const bool checkpointing : {true, false}) {
    SCOPED_TRACE(checkpointing ? "checkpointing" : "no checkpointing");
    PlanInput in = cuda_input("llama-2-7b", 16, 2, 512, OptimizerKind::adamw, "a100-80");
    in.checkpointing = checkpointing;
    in.lora.targets.fill(false);
    in.lora.targets[size_t(LoraTarget::Q)] = in.lora.targets[size_t(LoraTarget::Down)] = true;
    const MemoryPlan lora = make_plan(in);
    in.lora.dora = true;
    const MemoryPlan dora = make_plan(in);
    const uint64_t L = 32, C = 4096, I = 11008, N = 2 * 512, outs = C + C;  // q_proj and down_proj: out = C each
    EXPECT_EQ(dora.lora_params - lora.lora_params, L * outs);
    const uint64_t P = L * outs;
    EXPECT_EQ(bytes_of(dora, "LoRA A, B") - bytes_of(lora, "LoRA A, B"), P * 2);
    EXPECT_EQ(bytes_of(dora, "LoRA gradients") - bytes_of(lora, "LoRA gradients"), P * 4);
    EXPECT_EQ(bytes_of(dora, "fp32 master copies") - bytes_of(lora, "fp32 master copies"), P * 4);
    EXPECT_EQ(bytes_of(dora, "adamw state") - bytes_of(lora, "adamw state"), P * 8);
    const char* set = checkpointing ? "recompute working set (one layer)" : "saved activations (all layers)";
    EXPECT_EQ(bytes_of(dora, set) - bytes_of(lora, set), (checkpointing ? 1 : L) * outs * 4);
    EXPECT_EQ(bytes_of(dora, "DoRA products + norm panel"),
              2 * N * I * 2 + uint64_t(plan_cuda::kDoraPanelRows) * I * 4);  // wide = I
  }
}

// The advice is tight: its micro-batch and seq_len fit and one more does not;
// every switch's saving is the difference of the two plans.
TEST(PlanAdvice, LimitsAreTightAndSwitchesAreDifferences) {
  const PlanInput in = cuda_input("llama-3.1-8b", 64, 1, 2048, OptimizerKind::adamw, "rtx4090");
  const PlanAdvice a = make_advice(in);
  ASSERT_GT(a.max_micro_batch, 1);
  PlanInput x = in;
  x.micro_batch = a.max_micro_batch;
  EXPECT_NE(make_plan(x).verdict, Verdict::does_not_fit);
  x.micro_batch = a.max_micro_batch + 1;
  EXPECT_EQ(make_plan(x).verdict, Verdict::does_not_fit);
  ASSERT_GT(a.max_seq_len, 2048);
  x = in;
  x.seq_len = a.max_seq_len;
  EXPECT_NE(make_plan(x).verdict, Verdict::does_not_fit);
  if (a.max_seq_len < max_seq_len(in)) {
    x.seq_len = a.max_seq_len + 1;
    EXPECT_EQ(make_plan(x).verdict, Verdict::does_not_fit);
  }
  const uint64_t base = make_plan(in).device_bytes;
  std::vector<std::string> names;
  for (const PlanSwitch& s : a.switches) names.push_back(s.name);
  for (const char* n :
       {"checkpointing", "paged optimizer", "lower rank", "fewer targets", "shorter sequences"})
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
  for (const PlanSwitch& s : a.switches) {
    if (s.name == "checkpointing") {
      EXPECT_LT(s.saved_bytes, 0);  // on now: turning it off costs
    } else {
      EXPECT_GT(s.saved_bytes, 0) << s.name;
    }
  }
  x = in;
  x.lora.rank = 32;
  const auto lower =
      std::find_if(a.switches.begin(), a.switches.end(), [](auto& s) { return s.name == "lower rank"; });
  EXPECT_EQ(lower->saved_bytes, int64_t(base) - int64_t(make_plan(x).device_bytes));
  // A 70B model does not fit a 24 GiB card at any batch.
  const PlanAdvice none =
      make_advice(cuda_input("llama-2-70b", 16, 1, 512, OptimizerKind::paged_adamw, "rtx4090"));
  EXPECT_EQ(none.max_micro_batch, 0);
  EXPECT_EQ(none.max_seq_len, 0);
}

TEST(PlanAdvice, EveryPresetIsAnsweredInUnderASecond) {
  for (const std::string& name : preset_names()) {
    const auto t0 = std::chrono::steady_clock::now();
    const PlanInput in = cuda_input(name, 16, 1, 2048, OptimizerKind::adamw, "a100-80");
    const MemoryPlan p = make_plan(in);
    const PlanAdvice a = make_advice(in);
    const std::string text = plan_table(p) + advice_text(p, a) + plan_json(p).dump();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_LT(s, 1.0) << name;
    EXPECT_FALSE(text.empty());
  }
}

TEST(PlanRecipe, ModelFromFolderOrPreset) {
  ScratchDir d;
  Recipe r;
  r.model.path = (d / "absent").string();
  std::string e = error_of([&] { model_config_for(r); });
  EXPECT_NE(e.find("model.path"), std::string::npos) << e;
  EXPECT_NE(e.find("llama-2-70b"), std::string::npos) << e;
  r.model.preset = "llama-2-70b";
  EXPECT_EQ(model_config_for(r).num_hidden_layers, 80);
  write_builtin_model("tiny", d / "tiny");
  r.model.path = (d / "tiny").string();
  EXPECT_EQ(model_config_for(r).hidden_size, 128);  // the folder wins over the preset

  r.lora.rank = 8;
  r.lora.targets = {"q_proj", "v_proj"};
  r.data.seq_len = 128;
  r.train.micro_batch = 3;
  r.train.optimizer = "paged_adamw";
  r.quant.type = "none";
  r.device.memory_budget = "rtx4090";
  const PlanInput in = plan_input_from_recipe(r, model_config_for(r));
  EXPECT_EQ(in.backend, PlanBackend::cuda);  // auto + a GPU budget
  EXPECT_EQ(in.budget_bytes, 24 * kGiB);
  EXPECT_FALSE(in.quantize);
  EXPECT_EQ(in.lora.targets,
            (std::array<bool, kNumLoraTargets>{true, false, true, false, false, false, false}));
  EXPECT_EQ(in.optimizer.kind, OptimizerKind::paged_adamw);
  EXPECT_EQ(in.micro_batch * in.seq_len, 384);
  r.device.memory_budget = "lots";
  e = error_of([&] { plan_input_from_recipe(r, model_config_for(r)); });
  EXPECT_NE(e.find("device.memory_budget"), std::string::npos) << e;
}

// ---- `qlora estimate`

// `qlora estimate` with its model cache in the scratch folder.
CliResult run_estimate(const std::string& args, const ScratchDir& d) {
  return run_qlora("estimate " + args, "QLORA_CACHE='" + (d / "cache").string() + "'");
}

TEST(PlanCli, EstimatesAPresetAsTableAndJson) {
  ScratchDir d;
  CliResult r = run_estimate("--model llama-3.1-8b --gpu rtx4090 --seq 2048 --batch 1 --rank 16", d);
  ASSERT_EQ(r.status, 0) << r.output;
  for (const char* s : {"nf4 codes", "checkpointed layer inputs", "cross-entropy chunk", "CUDA context",
                        "verdict", "fits", "largest micro_batch", "longest seq_len", "paged_adamw"})
    EXPECT_NE(r.output.find(s), std::string::npos) << s << "\n" << r.output;
  r = run_estimate("--model llama-3.1-8b --gpu rtx4090 --seq 2048 --batch 1 --rank 16 --json", d);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j.at("verdict"), "fits");
  EXPECT_EQ(j.at("budget_bytes").get<uint64_t>(), 24 * kGiB);
  uint64_t device = 0;
  for (const auto& b : j.at("buffers"))
    if (b.at("place") == "device") device += b.at("bytes").get<uint64_t>();
  EXPECT_EQ(device, j.at("device_bytes").get<uint64_t>());
  EXPECT_GT(j.at("advice").at("max_micro_batch").get<int64_t>(), 1);
  EXPECT_FALSE(j.at("advice").at("switches").empty());
}

TEST(PlanCli, EstimatesARecipeOnTheCpu) {
  ScratchDir d;
  testing::write_bytes(d / "train.jsonl", "{\"text\": \"hello\"}\n");
  testing::write_bytes(d / "r.yaml",
                       "model: {path: builtin:tiny}\n"
                       "lora: {rank: 4, targets: attention}\n"
                       "data: {train: train.jsonl, format: text, seq_len: 64}\n"
                       "train: {micro_batch: 2, checkpointing: false}\n"
                       "device: {backend: cpu}\n"
                       "output: {dir: r.output}\n");
  const CliResult r = run_estimate("'" + (d / "r.yaml").string() + "' --json", d);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j.at("backend"), "cpu");
  EXPECT_EQ(j.at("settings").at("micro_batch"), 2);
  EXPECT_EQ(j.at("settings").at("lora_targets").size(), 4u);
  // The arenas as the library plans them for the same settings.
  write_builtin_model("tiny", d / "tiny");
  PlanInput in;
  in.model = load_model_config(d / "tiny");
  in.micro_batch = 2;
  in.seq_len = 64;
  in.checkpointing = false;
  in.lora.rank = 4;
  in.lora.targets = {true, true, true, true, false, false, false};
  EXPECT_EQ(j.at("cpu_arenas").at("activations").get<uint64_t>(), make_plan(in).arenas.activations);
  EXPECT_EQ(j.at("cpu_arenas").at("weights").get<uint64_t>(), make_plan(in).arenas.weights);
}

// A recipe's checkpointing: auto through `qlora estimate`, and --checkpointing
// auto/on over it: the builtin tiny model fits any machine without
// recomputation, so auto turns it off; on forces it back.
TEST(PlanCli, AutoCheckpointingFromTheRecipeAndTheCommandLine) {
  ScratchDir d;
  testing::write_bytes(d / "train.jsonl", "{\"text\": \"hello\"}\n");
  testing::write_bytes(d / "r.yaml",
                       "model: {path: builtin:tiny}\n"
                       "data: {train: train.jsonl, format: text, seq_len: 64}\n"
                       "train: {checkpointing: auto}\n"
                       "device: {backend: cpu}\n"
                       "output: {dir: r.output}\n");
  const std::string recipe = "'" + (d / "r.yaml").string() + "'";
  CliResult r = run_estimate(recipe + " --json", d);
  ASSERT_EQ(r.status, 0) << r.output;
  auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j.at("settings").at("checkpointing"), false);
  EXPECT_EQ(j.at("settings").at("checkpointing_auto"), true);
  r = run_estimate(recipe + " --checkpointing on --json", d);
  ASSERT_EQ(r.status, 0) << r.output;
  j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j.at("settings").at("checkpointing"), true);
  EXPECT_EQ(j.at("settings").at("checkpointing_auto"), false);
  r = run_estimate(recipe, d);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("checkpointing off (auto)"), std::string::npos) << r.output;
  r = run_estimate(recipe + " --checkpointing sometimes", d);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--checkpointing: expected on or off, got 'sometimes'"), std::string::npos) << r.output;
}

TEST(PlanCli, RecipeOverridesAsQloraRunTakesThem) {
  ScratchDir d;
  testing::write_bytes(d / "train.jsonl", "{\"text\": \"hello\"}\n");
  testing::write_bytes(d / "r.yaml",
                       "model: {path: builtin:tiny}\n"
                       "data: {train: train.jsonl, format: text, seq_len: 64}\n"
                       "device: {backend: cpu}\n"
                       "output: {dir: r.output}\n");
  const std::string recipe = "'" + (d / "r.yaml").string() + "'";
  CliResult r = run_estimate(recipe + " train.micro_batch=3 data.seq_len=128 --json", d);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  EXPECT_EQ(j.at("settings").at("micro_batch"), 3);
  EXPECT_EQ(j.at("settings").at("seq_len"), 128);
  r = run_estimate(recipe + " lora.rnak=4", d);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("did you mean 'lora.rank'"), std::string::npos) << r.output;
}

TEST(PlanCli, BadInputListsWhatIsKnown) {
  ScratchDir d;
  CliResult r = run_estimate("--model llama-9-1b --gpu rtx4090", d);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("llama-3.1-70b"), std::string::npos) << r.output;
  r = run_estimate("--model llama-2-7b --gpu gtx1080", d);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("rtx4090"), std::string::npos) << r.output;
  r = run_estimate("--model llama-2-7b --gpu rtx4090 --rank 5000", d);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("lora.rank"), std::string::npos) << r.output;
  r = run_estimate("--model llama-2-7b --gpu rtx4090 --seq 8192", d);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("data.seq_len"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace qlora
