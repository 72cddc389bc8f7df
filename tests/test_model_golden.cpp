// The model against an independent torch implementation (golden files: a
// llama and a qwen2 tiny model) and against transformers' own Qwen3 and
// Mistral classes with PEFT's LoRA (qwen3, qwen3 with sliding-window layers,
// mistral with a sliding window), and activation checkpointing against no
// checkpointing.
// If a golden file's format changes, re-run (each rewrites its files):
//   /usr/bin/python3 tests/reference/make_model_golden.py
//   build/interop-venv/bin/python tests/reference/make_model_golden_hf.py
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "io/safetensors.h"
#include "model/llama.h"
#include "testing.h"

namespace qlora {
namespace {

constexpr const char* kRegen =
    "re-run /usr/bin/python3 tests/reference/make_model_golden.py (llama, qwen2) or "
    "build/interop-venv/bin/python tests/reference/make_model_golden_hf.py (qwen3, sliding window)";

SafetensorsFile open_golden(const char* file) {
  return SafetensorsFile(std::string(QLORA_SOURCE_DIR) + "/tests/reference/" + file);
}

// llama: GQA, explicit head_dim, llama3 rope scaling, untied lm_head, no biases.
const SafetensorsFile& llama_golden() {
  static const SafetensorsFile f = open_golden("model_golden.safetensors");
  return f;
}

// qwen2: q/k/v biases, derived head_dim, default rope, tied lm_head.
const SafetensorsFile& qwen2_golden() {
  static const SafetensorsFile f = open_golden("model_golden_qwen2.safetensors");
  return f;
}

// qwen3 (transformers' Qwen3ForCausalLM): per-head q/k norms, head_dim 16
// with hidden 32 and 4 heads, GQA, tied lm_head, no biases.
const SafetensorsFile& qwen3_golden() {
  static const SafetensorsFile f = open_golden("model_golden_qwen3.safetensors");
  return f;
}

// qwen3 with use_sliding_window: window 3, max_window_layers 1 (layer 0 full,
// layer 1 sliding), untied.
const SafetensorsFile& qwen3_window_golden() {
  static const SafetensorsFile f = open_golden("model_golden_qwen3_window.safetensors");
  return f;
}

// mistral (MistralForCausalLM): sliding_window 4 on every layer, documents up to 9.
const SafetensorsFile& mistral_window_golden() {
  static const SafetensorsFile f = open_golden("model_golden_mistral_window.safetensors");
  return f;
}

std::vector<const SafetensorsFile*> all_goldens() {
  return {&llama_golden(), &qwen2_golden(), &qwen3_golden(), &qwen3_window_golden(), &mistral_window_golden()};
}

template <typename T>
std::vector<T> gtensor(const SafetensorsFile& g, const std::string& name) {
  return testing::golden_tensor<T>(g, name, kRegen);
}

// A golden model as an HF folder (config.json + model.safetensors), without
// the tensor named `drop` (if any).
void write_golden_model(const SafetensorsFile& g, const std::filesystem::path& dir,
                        std::string_view drop = {}) {
  std::vector<OwnedTensor> ts;
  for (const TensorInfo& t : g.tensors()) {
    if (t.name.rfind("model.", 0) != 0 && t.name != "lm_head.weight") continue;
    if (t.name == drop) continue;
    const auto bytes = g.data(t);
    ts.push_back({t.name, t.dtype, t.shape, std::vector<uint8_t>(bytes.begin(), bytes.end())});
  }
  save_safetensors(dir / "model.safetensors", ts);
  testing::write_bytes(dir / "config.json", g.metadata().at("config"));
}

LoraWeights golden_lora(const SafetensorsFile& g, const ModelConfig& cfg, double dropout = 0.0) {
  LoraConfig lc;
  lc.rank = std::stoll(g.metadata().at("lora_rank"));
  lc.alpha = std::stod(g.metadata().at("lora_alpha"));
  lc.dropout = dropout;
  LoraWeights lw(cfg, lc);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      for (bool a : {true, false}) {
        const auto v = gtensor<float>(g, lw.peft_name(l, LoraTarget(t), a));
        std::copy(v.begin(), v.end(), a ? lw.A(l, LoraTarget(t)) : lw.B(l, LoraTarget(t)));
      }
  return lw;
}

// max |a - b| / max |b|: a normwise relative error, insensitive to the
// individual entries that happen to be near zero.
double rel_error(const float* a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num = std::max(num, std::abs(double(a[i]) - b[i]));
    den = std::max(den, std::abs(double(b[i])));
  }
  return num / den;
}

struct GoldenBatch {
  explicit GoldenBatch(const SafetensorsFile& g)
      : tokens(gtensor<int32_t>(g, "input.tokens")),
        targets(gtensor<int32_t>(g, "input.targets")),
        positions(gtensor<int32_t>(g, "input.positions")),
        B(g.find("input.tokens")->shape[0]),
        T(g.find("input.tokens")->shape[1]) {}
  std::vector<int32_t> tokens, targets, positions;
  int64_t B, T;
  LlamaBatch batch() const { return {tokens.data(), targets.data(), positions.data(), B, T}; }
};

TEST(ModelGolden, FilesAreTheExpectedVersion) {
  for (const SafetensorsFile* g : all_goldens()) {
    const auto& m = g->metadata();
    ASSERT_EQ(m.count("magic"), 1u) << g->path() << ": " << kRegen;
    EXPECT_EQ(m.at("magic"), "qlora-model-golden") << g->path() << ": " << kRegen;
    EXPECT_EQ(m.at("version"), "1") << g->path() << ": " << kRegen;
  }
}

// Tolerances of the issue: fp32 against an fp64 reference (whose own
// rounding is negligible), so logits agree to ~1e-6 and gradients (longer
// chains) to ~1e-5; the bounds allow 10x that.
void expect_matches_torch(const SafetensorsFile& g, const LlamaWeights& w) {
  LoraWeights lora = golden_lora(g, w.cfg);
  const GoldenBatch gb(g);
  LlamaModel model(w, &lora, gb.B, gb.T);

  std::vector<float> logits(static_cast<size_t>(gb.B * gb.T * w.cfg.vocab_size));
  model.logits(logits.data(), gb.batch());
  const auto expect_logits = gtensor<float>(g, "expected.logits");
  ASSERT_EQ(logits.size(), expect_logits.size()) << kRegen;
  EXPECT_LE(rel_error(logits.data(), expect_logits), 1e-5);

  const double loss = model.forward(gb.batch());
  const float expect_loss = gtensor<float>(g, "expected.loss")[0];
  EXPECT_NEAR(loss, expect_loss, 1e-5 * std::abs(expect_loss));
  lora.zero_grad();
  model.backward();
  for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      for (bool a : {true, false}) {
        const std::string name = lora.peft_name(l, LoraTarget(t), a);
        const auto grad = gtensor<float>(g, "grad." + name);
        const float* mine = a ? lora.dA(l, LoraTarget(t)) : lora.dB(l, LoraTarget(t));
        EXPECT_LE(rel_error(mine, grad), 1e-4) << name;
      }
}

LlamaWeights load_dense(const std::filesystem::path& dir) {
  WeightLoadOptions opt;
  opt.quantize = false;  // the golden base weights are plain fp32 (see the script)
  return load_llama_weights(dir, opt);
}

TEST(ModelGolden, LogitsLossAndLoraGradientsMatchTorch) {
  testing::ScratchDir dir;
  write_golden_model(llama_golden(), dir.path());
  const LlamaWeights w = load_dense(dir.path());
  ASSERT_NE(w.lm_head, w.embed);  // the untied path
  expect_matches_torch(llama_golden(), w);
}

// The same through Qwen2's differences: the q/k/v biases (added before RoPE,
// and still there under the LoRA), no o_proj bias, a tied lm_head, and a
// sliding_window that must not apply (use_sliding_window is false; the
// documents are longer than the window).
TEST(ModelGolden, Qwen2LogitsLossAndLoraGradientsMatchTorch) {
  testing::ScratchDir dir;
  write_golden_model(qwen2_golden(), dir.path());
  const LlamaWeights w = load_dense(dir.path());
  ASSERT_EQ(w.cfg.arch, Arch::Qwen2);
  EXPECT_EQ(w.lm_head, w.embed);
  for (const LlamaLayerWeights& lw : w.layers) {
    EXPECT_NE(lw.q_bias, nullptr);
    EXPECT_NE(lw.k_bias, nullptr);
    EXPECT_NE(lw.v_bias, nullptr);
    EXPECT_EQ(lw.o_bias, nullptr);
  }
  expect_matches_torch(qwen2_golden(), w);
}

// Qwen3: q_proj projects C = 32 to H*D = 64 and o_proj back (head_dim is not
// hidden / heads), each query and key head is RMS-normed by q_norm/k_norm
// (weights drawn away from 1) before RoPE, no biases, tied lm_head.
TEST(ModelGolden, Qwen3LogitsLossAndLoraGradientsMatchTransformers) {
  testing::ScratchDir dir;
  write_golden_model(qwen3_golden(), dir.path());
  const LlamaWeights w = load_dense(dir.path());
  ASSERT_EQ(w.cfg.arch, Arch::Qwen3);
  EXPECT_TRUE(w.cfg.qk_norm);
  EXPECT_NE(w.cfg.q_dim(), w.cfg.hidden_size);
  EXPECT_FALSE(w.cfg.sliding_window.has_value());
  EXPECT_EQ(w.lm_head, w.embed);
  for (const LlamaLayerWeights& lw : w.layers) {
    EXPECT_NE(lw.q_norm, nullptr);
    EXPECT_NE(lw.k_norm, nullptr);
    EXPECT_EQ(lw.q_bias, nullptr);
    EXPECT_EQ(lw.o_bias, nullptr);
  }
  expect_matches_torch(qwen3_golden(), w);
}

TEST(ModelGolden, Qwen3FolderMissingAQkNormNamesTheTensor) {
  for (const char* missing : {"model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"}) {
    testing::ScratchDir dir;
    ASSERT_NE(qwen3_golden().find(missing), nullptr) << kRegen;
    write_golden_model(qwen3_golden(), dir.path(), missing);
    const std::string err = testing::error_of([&] { load_llama_weights(dir.path()); });
    EXPECT_NE(err.find(missing), std::string::npos) << err;
    EXPECT_NE(err.find("[D] = [16]"), std::string::npos) << err;
  }
}

// Sliding windows shorter than the documents: Mistral on every layer; Qwen3
// (use_sliding_window, max_window_layers 1) on layer 1 only. Without the
// window the same weights give other logits, so the window is what matches.
TEST(ModelGolden, SlidingWindowMatchesTransformers) {
  for (const SafetensorsFile* g : {&mistral_window_golden(), &qwen3_window_golden()}) {
    SCOPED_TRACE(g->path().string());
    testing::ScratchDir dir;
    write_golden_model(*g, dir.path());
    LlamaWeights w = load_dense(dir.path());
    ASSERT_TRUE(w.cfg.sliding_window.has_value());
    if (w.cfg.arch == Arch::Qwen3) {
      EXPECT_EQ(w.cfg.attention_window(0), 0);
      EXPECT_EQ(w.cfg.attention_window(1), 3);
    } else {
      EXPECT_EQ(w.cfg.attention_window(0), 4);
      EXPECT_EQ(w.cfg.attention_window(1), 4);
    }
    expect_matches_torch(*g, w);

    w.cfg.sliding_window.reset();
    LoraWeights lora = golden_lora(*g, w.cfg);
    const GoldenBatch gb(*g);
    LlamaModel full(w, &lora, gb.B, gb.T);
    std::vector<float> logits(static_cast<size_t>(gb.B * gb.T * w.cfg.vocab_size));
    full.logits(logits.data(), gb.batch());
    EXPECT_GT(rel_error(logits.data(), gtensor<float>(*g, "expected.logits")), 1e-3);
  }
}

TEST(ModelGolden, Qwen2FolderMissingABiasNamesTheTensor) {
  testing::ScratchDir dir;
  const std::string missing = "model.layers.1.self_attn.q_proj.bias";
  ASSERT_NE(qwen2_golden().find(missing), nullptr) << kRegen;
  write_golden_model(qwen2_golden(), dir.path(), missing);
  const std::string err = testing::error_of([&] { load_llama_weights(dir.path()); });
  EXPECT_NE(err.find(missing), std::string::npos) << err;
}

// Gradients with and without checkpointing, bit for bit: the recomputation
// runs the same ops on the same inputs (dropout masks are counter-based).
// NF4 base weights; the qwen2 model adds the biased projections, qwen3 the
// q/k norms, the window models the sliding-window masks.
TEST(ModelGolden, CheckpointingGivesIdenticalGradients) {
  for (const SafetensorsFile* g : all_goldens()) {
    SCOPED_TRACE(g->path().string());
    testing::ScratchDir dir;
    write_golden_model(*g, dir.path());
    const LlamaWeights w = load_llama_weights(dir.path());  // NF4 this time
    const GoldenBatch gb(*g);
    std::vector<std::vector<float>> grads[2];
    for (int ckpt = 0; ckpt < 2; ++ckpt) {
      LoraWeights lora = golden_lora(*g, w.cfg, 0.1);
      const int64_t r = lora.config().rank;
      LlamaRunOptions ro;
      ro.checkpointing = ckpt == 1;
      LlamaModel model(w, &lora, gb.B, gb.T, ro);
      model.forward(gb.batch());
      model.backward();
      for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
        for (int t = 0; t < kNumLoraTargets; ++t) {
          const auto [in, out] = lora_target_dims(w.cfg, LoraTarget(t));
          const float* a = lora.dA(l, LoraTarget(t));
          const float* b = lora.dB(l, LoraTarget(t));
          grads[ckpt].emplace_back(a, a + r * in);
          grads[ckpt].emplace_back(b, b + out * r);
        }
    }
    ASSERT_EQ(grads[0].size(), grads[1].size());
    for (size_t i = 0; i < grads[0].size(); ++i) EXPECT_EQ(grads[0][i], grads[1][i]) << "tensor " << i;
  }
}

}  // namespace
}  // namespace qlora
