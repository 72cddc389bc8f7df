// Whole-model LoRA gradients against finite differences (tiny random model
// with GQA, llama3 rope scaling, two packed documents per row, NF4 base), and
// bad input: files disagreeing with config.json, NaN weights, bad positions,
// adapters for another model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "testing.h"

namespace qlora {
namespace {

const SafetensorsFile& golden() {
  static const SafetensorsFile f(std::string(QLORA_SOURCE_DIR) + "/tests/reference/model_golden.safetensors");
  return f;
}

// The golden script's tiny model as an HF folder; `edit` may alter a tensor.
void write_model(const std::filesystem::path& dir, const std::string& config,
                 void (*edit)(OwnedTensor&) = nullptr) {
  std::vector<OwnedTensor> ts;
  for (const TensorInfo& t : golden().tensors()) {
    if (t.name.rfind("model.", 0) != 0 && t.name != "lm_head.weight") continue;
    const auto bytes = golden().data(t);
    ts.push_back({t.name, t.dtype, t.shape, std::vector<uint8_t>(bytes.begin(), bytes.end())});
    if (edit) edit(ts.back());
  }
  save_safetensors(dir / "model.safetensors", ts);
  testing::write_bytes(dir / "config.json", config);
}

std::vector<int32_t> ints(const std::string& name) {
  const auto b = golden().data(*golden().find(name));
  std::vector<int32_t> v(b.size() / 4);
  std::memcpy(v.data(), b.data(), b.size());
  return v;
}

// Finite differences of the fp32 loss L (~5) with step h = 1e-2 on LoRA
// entries of size ~0.2. Rounding: L carries a relative error of at most about
// k u with k ~ 64 accumulation steps along its longest chain, so the central
// difference has an absolute error up to k u |L| / h ~ 2e-3 (u = 2^-24).
// Truncation: h^2/6 |L'''| ~ 2e-5 |L'''|; allowed as 2e-2 relative.
// The entries with the largest gradients are checked, so the signal is far
// above that floor.
TEST(ModelGrad, LoraGradientsMatchFiniteDifferences) {
  testing::ScratchDir dir;
  write_model(dir.path(), golden().metadata().at("config"));
  const LlamaWeights w = load_llama_weights(dir.path());  // NF4 + double quant
  LoraConfig lc;
  lc.rank = 4;
  lc.alpha = 8;
  LoraWeights lora(w.cfg, lc);
  for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      for (bool a : {true, false}) {
        const auto b = golden().data(*golden().find(lora.peft_name(l, LoraTarget(t), a)));
        std::memcpy(a ? lora.A(l, LoraTarget(t)) : lora.B(l, LoraTarget(t)), b.data(), b.size());
      }
  const auto tokens = ints("input.tokens"), targets = ints("input.targets"), positions = ints("input.positions");
  const LlamaBatch batch{tokens.data(), targets.data(), positions.data(), 2, int64_t(tokens.size()) / 2};
  LlamaModel model(w, &lora, batch.B, batch.T);
  const double L0 = model.forward(batch);
  model.backward();
  constexpr float h = 1e-2f;
  const double floor = 64 * 5.96e-8 * std::abs(L0) / h;
  int checked = 0;
  for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      for (bool is_a : {true, false}) {
        const auto [in, out] = lora_target_dims(w.cfg, LoraTarget(t));
        const int64_t n = is_a ? 4 * in : out * 4;
        float* p = is_a ? lora.A(l, LoraTarget(t)) : lora.B(l, LoraTarget(t));
        const float* g = is_a ? lora.dA(l, LoraTarget(t)) : lora.dB(l, LoraTarget(t));
        const int64_t j = std::max_element(g, g + n, [](float x, float y) { return std::abs(x) < std::abs(y); }) - g;
        const float gj = g[j], orig = p[j];
        p[j] = orig + h;
        const double Lp = model.forward(batch);
        p[j] = orig - h;
        const double Lm = model.forward(batch);
        p[j] = orig;
        const double fd = (Lp - Lm) / (2.0 * h);
        EXPECT_NEAR(gj, fd, floor + 2e-2 * std::abs(fd)) << lora.peft_name(l, LoraTarget(t), is_a) << "[" << j << "]";
        ++checked;
      }
  EXPECT_EQ(checked, 28);
}

TEST(ModelBadInput, ShapesDisagreeingWithConfigNameTheTensor) {
  testing::ScratchDir dir;
  std::string cfg = golden().metadata().at("config");
  const auto at = cfg.find("\"intermediate_size\": 48");
  ASSERT_NE(at, std::string::npos);
  cfg.replace(at, 23, "\"intermediate_size\": 40");
  write_model(dir.path(), cfg);
  try {
    load_llama_weights(dir.path());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mlp.gate_proj.weight"), std::string::npos) << e.what();
  }
}

TEST(ModelBadInput, NanWeightIsRefusedByName) {
  testing::ScratchDir dir;
  write_model(dir.path(), golden().metadata().at("config"), [](OwnedTensor& t) {
    if (t.name != "model.layers.1.mlp.up_proj.weight") return;
    const float nan = std::nanf("");
    std::memcpy(t.bytes.data() + 40, &nan, 4);
  });
  try {
    load_llama_weights(dir.path());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << e.what();
  }
}

TEST(ModelBadInput, BadPositionsAndOversizedBatchesAreRefused) {
  testing::ScratchDir dir;
  write_model(dir.path(), golden().metadata().at("config"));
  const LlamaWeights w = load_llama_weights(dir.path());
  LlamaModel model(w, nullptr, 1, 4);
  const std::vector<int32_t> tokens = {1, 2, 3, 4}, targets = {2, 3, 4, -100};
  const std::vector<int32_t> bad_pos = {0, 1, 3, 4};
  EXPECT_THROW(model.forward({tokens.data(), targets.data(), bad_pos.data(), 1, 4}), Error);
  EXPECT_THROW(model.forward({tokens.data(), targets.data(), nullptr, 2, 2}), Error);
  const std::vector<int32_t> bad_tok = {1, 2, 96, 4};
  EXPECT_THROW(model.forward({bad_tok.data(), targets.data(), nullptr, 1, 4}), Error);
  EXPECT_THROW(LlamaModel(w, nullptr, 1, w.cfg.max_position_embeddings + 1), Error);
  EXPECT_NO_THROW(model.forward({tokens.data(), targets.data(), nullptr, 1, 4}));
}

TEST(ModelBadInput, AdapterForAnotherShapeIsRefusedByName) {
  testing::ScratchDir dir;
  write_model(dir.path(), golden().metadata().at("config"));
  const ModelConfig cfg = load_model_config(dir.path());
  const auto ad = dir / "adapter";
  std::filesystem::create_directories(ad);
  testing::write_bytes(ad / "adapter_config.json", R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})");
  std::vector<OwnedTensor> ts;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = "base_model.model.model.layers." + std::to_string(l) + ".self_attn.q_proj.";
    const int64_t in = l == 1 ? 16 : cfg.hidden_size;  // layer 1 from a narrower model
    ts.push_back({p + "lora_A.weight", DType::F32, {4, in}, std::vector<uint8_t>(size_t(16 * in))});
    ts.push_back({p + "lora_B.weight", DType::F32, {cfg.q_dim(), 4}, std::vector<uint8_t>(size_t(16 * cfg.q_dim()))});
  }
  save_safetensors(ad / "adapter_model.safetensors", ts);
  try {
    LoraWeights::load_peft(ad, cfg);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.1.self_attn.q_proj.lora_A"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace qlora
