// The model against an independent torch implementation (golden file), and
// activation checkpointing against no checkpointing.
// If the golden file's format changes, re-run:
//   /usr/bin/python3 tests/reference/make_model_golden.py
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "model/llama.h"
#include "testing.h"

namespace qlora {
namespace {

constexpr const char* kRegen = "re-run /usr/bin/python3 tests/reference/make_model_golden.py";

const SafetensorsFile& golden() {
  static const SafetensorsFile f(std::string(QLORA_SOURCE_DIR) + "/tests/reference/model_golden.safetensors");
  return f;
}

template <typename T>
std::vector<T> gtensor(const std::string& name) {
  return testing::golden_tensor<T>(golden(), name, kRegen);
}

// The golden model as an HF folder (config.json + model.safetensors).
void write_golden_model(const std::filesystem::path& dir) {
  std::vector<OwnedTensor> ts;
  for (const TensorInfo& t : golden().tensors()) {
    if (t.name.rfind("model.", 0) != 0 && t.name != "lm_head.weight") continue;
    const auto bytes = golden().data(t);
    ts.push_back({t.name, t.dtype, t.shape, std::vector<uint8_t>(bytes.begin(), bytes.end())});
  }
  save_safetensors(dir / "model.safetensors", ts);
  testing::write_bytes(dir / "config.json", golden().metadata().at("config"));
}

LoraWeights golden_lora(const ModelConfig& cfg, double dropout = 0.0) {
  LoraConfig lc;
  lc.rank = std::stoll(golden().metadata().at("lora_rank"));
  lc.alpha = std::stod(golden().metadata().at("lora_alpha"));
  lc.dropout = dropout;
  LoraWeights lw(cfg, lc);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      for (bool a : {true, false}) {
        const auto v = gtensor<float>(lw.peft_name(l, LoraTarget(t), a));
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
  std::vector<int32_t> tokens = gtensor<int32_t>("input.tokens"), targets = gtensor<int32_t>("input.targets"),
                       positions = gtensor<int32_t>("input.positions");
  int64_t B = golden().find("input.tokens")->shape[0], T = golden().find("input.tokens")->shape[1];
  LlamaBatch batch() const { return {tokens.data(), targets.data(), positions.data(), B, T}; }
};

TEST(ModelGolden, FileIsTheExpectedVersion) {
  const auto& m = golden().metadata();
  ASSERT_EQ(m.count("magic"), 1u) << kRegen;
  EXPECT_EQ(m.at("magic"), "qlora-model-golden") << kRegen;
  EXPECT_EQ(m.at("version"), "1") << kRegen;
}

// Tolerances of the issue: fp32 on both sides, differing only in summation
// order, so logits agree to ~1e-6 and gradients (longer chains) to ~1e-5.
TEST(ModelGolden, LogitsLossAndLoraGradientsMatchTorch) {
  testing::ScratchDir dir;
  write_golden_model(dir.path());
  WeightLoadOptions opt;
  opt.quantize = false;  // the golden base weights are plain fp32 (see the script)
  const LlamaWeights w = load_llama_weights(dir.path(), opt);
  LoraWeights lora = golden_lora(w.cfg);
  const GoldenBatch gb;
  LlamaModel model(w, &lora, gb.B, gb.T);

  std::vector<float> logits(size_t(gb.B * gb.T * w.cfg.vocab_size));
  model.logits(logits.data(), gb.batch());
  const auto expect_logits = gtensor<float>("expected.logits");
  ASSERT_EQ(logits.size(), expect_logits.size()) << kRegen;
  EXPECT_LE(rel_error(logits.data(), expect_logits), 1e-5);

  const double loss = model.forward(gb.batch());
  const float expect_loss = gtensor<float>("expected.loss")[0];
  EXPECT_NEAR(loss, expect_loss, 1e-5 * std::abs(expect_loss));
  lora.zero_grad();
  model.backward();
  for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      for (bool a : {true, false}) {
        const std::string name = lora.peft_name(l, LoraTarget(t), a);
        const auto g = gtensor<float>("grad." + name);
        const float* mine = a ? lora.dA(l, LoraTarget(t)) : lora.dB(l, LoraTarget(t));
        EXPECT_LE(rel_error(mine, g), 1e-4) << name;
      }
}

// Gradients with and without checkpointing, bit for bit: the recomputation
// runs the same ops on the same inputs (dropout masks are counter-based).
TEST(ModelGolden, CheckpointingGivesIdenticalGradients) {
  testing::ScratchDir dir;
  write_golden_model(dir.path());
  const LlamaWeights w = load_llama_weights(dir.path());  // NF4 this time
  const GoldenBatch gb;
  std::vector<std::vector<float>> grads[2];
  for (int ckpt = 0; ckpt < 2; ++ckpt) {
    LoraWeights lora = golden_lora(w.cfg, 0.1);
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
        grads[ckpt].emplace_back(a, a + 4 * in);
        grads[ckpt].emplace_back(b, b + out * 4);
      }
  }
  ASSERT_EQ(grads[0].size(), grads[1].size());
  for (size_t i = 0; i < grads[0].size(); ++i) EXPECT_EQ(grads[0][i], grads[1][i]) << "tensor " << i;
}

}  // namespace
}  // namespace qlora
