// A PEFT adapter end to end: loaded by name and shape, applied in generation
// exactly as a merged model W + (alpha/r) B A would compute, and a zero-B
// adapter leaves the base model unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/llama_generate.h"
#include "model/lora.h"
#include "testing.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;

std::vector<float> as_f32(const SafetensorsModel& m, const std::string& name) {
  const auto& e = m.at(name);
  std::vector<float> v(size_t(e.info->numel()));
  convert_to_f32(e.file->data(*e.info).data(), e.info->dtype, v.size(), v.data());
  return v;
}

OwnedTensor f32_tensor(const std::string& name, Shape shape, const std::vector<float>& v) {
  OwnedTensor t{name, DType::F32, std::move(shape), std::vector<uint8_t>(v.size() * 4)};
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

std::vector<float> step0_logits(const LlamaWeights& w, const LoraWeights* lora) {
  LlamaGenerator gen(w, lora, 8);
  std::vector<float> logits(size_t(w.cfg.vocab_size));
  const int32_t bos = 1;
  gen.feed(&bos, 1, logits.data());
  return logits;
}

TEST(Adapter, PeftAdapterEqualsTheMergedModel) {
  QLORA_REQUIRE_FIXTURES(fx);
  const fs::path base = fx / "models/stories260K/hf";
  testing::ScratchDir dir;
  const SafetensorsModel m(base);
  const ModelConfig cfg = load_model_config(base);
  const int64_t R = 4;
  const double alpha = 8.0, scale = alpha / double(R);

  // Adapter on q_proj and v_proj of every layer, A and B random (B non-zero).
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 0.05f);
  std::vector<OwnedTensor> adapter, merged;
  for (const auto& name : m.names()) merged.push_back(f32_tensor(name, m.at(name).info->shape, as_f32(m, name)));
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    for (const char* proj : {"q_proj", "v_proj"}) {
      const std::string w = "model.layers." + std::to_string(l) + ".self_attn." + proj;
      const Shape ws = m.at(w + ".weight").info->shape;  // [OUT, IN]
      const int64_t OUT = ws[0], IN = ws[1];
      std::vector<float> A(size_t(R * IN)), B(size_t(OUT * R));
      for (auto& x : A) x = nd(rng);
      for (auto& x : B) x = nd(rng);
      adapter.push_back(f32_tensor("base_model.model." + w + ".lora_A.weight", {R, IN}, A));
      adapter.push_back(f32_tensor("base_model.model." + w + ".lora_B.weight", {OUT, R}, B));
      // Merged weight, computed in double: W + scale * B A.
      for (auto& t : merged) {
        if (t.name != w + ".weight") continue;
        auto* W = reinterpret_cast<float*>(t.bytes.data());
        for (int64_t o = 0; o < OUT; ++o)
          for (int64_t i = 0; i < IN; ++i) {
            double d = 0;
            for (int64_t r = 0; r < R; ++r) d += double(B[size_t(o * R + r)]) * A[size_t(r * IN + i)];
            W[o * IN + i] = float(double(W[o * IN + i]) + scale * d);
          }
      }
    }
  }
  fs::create_directories(dir / "adapter");
  save_safetensors(dir / "adapter" / "adapter_model.safetensors", adapter);
  std::ofstream(dir / "adapter" / "adapter_config.json")
      << R"({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,)"
      << R"( "target_modules": ["q_proj", "v_proj"], "use_rslora": false, "bias": "none"})";
  fs::create_directories(dir / "merged");
  fs::copy_file(base / "config.json", dir / "merged" / "config.json");
  save_safetensors(dir / "merged" / "model.safetensors", merged);

  WeightLoadOptions dense;
  dense.quantize = false;
  const LlamaWeights w = load_llama_weights(base, dense);
  const LlamaWeights wm = load_llama_weights(dir / "merged", dense);
  const LoraWeights lora = LoraWeights::load_peft(dir / "adapter", cfg);
  EXPECT_EQ(lora.config().rank, R);
  EXPECT_FLOAT_EQ(lora.config().scale(), float(scale));
  EXPECT_FALSE(lora.has(LoraTarget::K));
  const auto with_adapter = step0_logits(w, &lora);
  const auto with_merge = step0_logits(wm, nullptr);
  const auto without = step0_logits(w, nullptr);
  double max_diff = 0, max_change = 0, mag = 0;
  for (size_t i = 0; i < with_adapter.size(); ++i) {
    max_diff = std::max(max_diff, std::fabs(double(with_adapter[i]) - with_merge[i]));
    max_change = std::max(max_change, std::fabs(double(with_adapter[i]) - without[i]));
    mag = std::max(mag, std::fabs(double(with_merge[i])));
  }
  // fp32 through 5 layers of C = 64 sums: a few hundred ulps of the logit scale.
  EXPECT_LT(max_diff, 1e-4 * mag) << "adapter vs merged";
  EXPECT_GT(max_change, 100 * max_diff) << "the adapter must change the logits";

  // A zero-B adapter (PEFT's initial state) leaves the model unchanged, bit for bit.
  for (auto& t : adapter)
    if (t.name.find("lora_B") != std::string::npos) std::fill(t.bytes.begin(), t.bytes.end(), 0);
  save_safetensors(dir / "adapter" / "adapter_model.safetensors", adapter);
  const LoraWeights zero = LoraWeights::load_peft(dir / "adapter", cfg);
  EXPECT_EQ(step0_logits(w, &zero), without);
}

}  // namespace
}  // namespace qlora
