// The PEFT adapter folder: written atomically, read back bit for bit by
// LoraWeights::load_peft, with PEFT's config fields and tensor names/shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "io/safetensors.h"
#include "model/lora.h"
#include "test_models.h"
#include "testing.h"
#include "train/peft_adapter.h"

namespace qlora {
namespace {

using testing::FileSizeLimit;
using testing::random_lora;

LoraConfig subset_config() {
  LoraConfig lc;
  lc.rank = 4;
  lc.alpha = 8;
  lc.dropout = 0.05;
  lc.targets.fill(false);
  lc.targets[size_t(LoraTarget::V)] = true;
  lc.targets[size_t(LoraTarget::Q)] = true;
  lc.targets[size_t(LoraTarget::K)] = true;
  lc.targets[size_t(LoraTarget::Down)] = true;
  return lc;
}

TEST(PeftAdapter, RoundTripIsBitIdentical) {
  const ModelConfig cfg = testing::tiny_gqa_config(3);
  for (bool all : {true, false}) {
    LoraConfig lc = all ? LoraConfig{} : subset_config();
    lc.rslora = !all;
    const LoraWeights w = random_lora(cfg, lc, 11);
    testing::ScratchDir dir;
    save_peft_adapter(w, cfg, dir / "adapter", "meta-llama/Llama-3.2-1B");
    const LoraWeights r = LoraWeights::load_peft(dir / "adapter", cfg);
    EXPECT_EQ(r.config().rank, lc.rank);
    EXPECT_EQ(r.config().alpha, lc.alpha);
    EXPECT_EQ(r.config().rslora, lc.rslora);
    EXPECT_EQ(r.config().dropout, lc.dropout);
    EXPECT_EQ(r.config().targets, lc.targets);
    ASSERT_EQ(r.flat_size(), w.flat_size());
    EXPECT_EQ(std::memcmp(r.flat_params(), w.flat_params(), w.flat_size() * sizeof(float)), 0);
  }
}

// PEFT 0.22 saves target_modules="all-linear" as full module paths; it
// matches a module by its name or a "." + name suffix, and so does qlora.
// rank_pattern / alpha_pattern are read (test_lora_patterns.cpp); a pattern
// whose rank the tensors do not have is refused naming the tensor, and one
// that matches no module naming its key.
TEST(PeftAdapter, FullPathTargetsLoadAndPatternsAreCheckedAgainstTheTensors) {
  const ModelConfig cfg = testing::tiny_gqa_config(3);
  const LoraConfig lc = subset_config();
  const LoraWeights w = random_lora(cfg, lc, 5);
  testing::ScratchDir dir;
  save_peft_adapter(w, cfg, dir / "a", "base");
  const auto file = dir / "a" / "adapter_config.json";
  auto j = nlohmann::json::parse(testing::read_bytes(file));
  j["target_modules"] = {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                         "model.layers.2.self_attn.q_proj", "k_proj", "model.layers.0.self_attn.v_proj",
                         "model.layers.2.mlp.down_proj"};
  testing::write_bytes(file, j.dump());
  const LoraWeights r = LoraWeights::load_peft(dir / "a", cfg);
  EXPECT_EQ(r.config().targets, lc.targets);
  EXPECT_EQ(std::memcmp(r.flat_params(), w.flat_params(), w.flat_size() * sizeof(float)), 0);
  {
    auto bad = j;
    bad["rank_pattern"] = {{"v_proj", 2}};
    testing::write_bytes(file, bad.dump());
    const std::string e = testing::error_of([&] { LoraWeights::load_peft(dir / "a", cfg); });
    EXPECT_NE(e.find("self_attn.v_proj.lora_A.weight has shape [4, 32], expected [2, 32]"), std::string::npos) << e;
  }
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    auto bad = j;
    bad[key] = {{"vproj", 2}};
    testing::write_bytes(file, bad.dump());
    const std::string e = testing::error_of([&] { LoraWeights::load_peft(dir / "a", cfg); });
    EXPECT_NE(e.find(std::string(key) + " key 'vproj' matches no module"), std::string::npos) << e;
    EXPECT_NE(e.find("adapter_config.json"), std::string::npos) << e;
  }
  j["target_modules"] = {"model.layers.0.self_attn.rotary_emb"};
  testing::write_bytes(file, j.dump());
  const std::string e = testing::error_of([&] { LoraWeights::load_peft(dir / "a", cfg); });
  EXPECT_NE(e.find("is not a Llama block linear"), std::string::npos) << e;
}

TEST(PeftAdapter, ConfigFields) {
  const ModelConfig cfg = testing::tiny_gqa_config(3);
  LoraConfig lc = subset_config();
  const LoraWeights w = random_lora(cfg, lc, 3);
  testing::ScratchDir dir;
  save_peft_adapter(w, cfg, dir / "a", "/models/llama");
  std::ifstream f(dir / "a" / "adapter_config.json");
  const auto j = nlohmann::json::parse(f);
  EXPECT_EQ(j.at("peft_type"), "LORA");
  EXPECT_EQ(j.at("task_type"), "CAUSAL_LM");
  EXPECT_EQ(j.at("r"), 4);
  EXPECT_TRUE(j.at("lora_alpha").is_number_integer());  // PEFT's type for a whole alpha
  EXPECT_EQ(j.at("lora_alpha"), 8);
  EXPECT_EQ(j.at("lora_dropout"), 0.05);
  EXPECT_EQ(j.at("target_modules"), nlohmann::json({"down_proj", "k_proj", "q_proj", "v_proj"}));  // sorted
  EXPECT_EQ(j.at("use_rslora"), false);
  EXPECT_EQ(j.at("use_dora"), false);
  EXPECT_EQ(j.at("bias"), "none");
  EXPECT_EQ(j.at("base_model_name_or_path"), "/models/llama");
  EXPECT_EQ(j.at("fan_in_fan_out"), false);
  EXPECT_EQ(j.at("inference_mode"), true);
  EXPECT_EQ(j.at("init_lora_weights"), true);
  for (const char* k : {"modules_to_save", "layers_to_transform", "revision"})
    EXPECT_TRUE(j.at(k).is_null()) << k;
  // PEFT warns about keys its LoraConfig does not know: none of ours.
  EXPECT_FALSE(j.contains("qlora_version"));
  // A fractional alpha stays a float.
  lc.alpha = 12.5;
  const auto j2 = peft_adapter_config(lc, "x");
  EXPECT_TRUE(j2.at("lora_alpha").is_number_float());
  EXPECT_EQ(j2.at("lora_alpha"), 12.5);
}

TEST(PeftAdapter, TensorNamesShapesAndDtype) {
  const ModelConfig cfg = testing::tiny_gqa_config(3);
  const LoraConfig lc = subset_config();
  const LoraWeights w = random_lora(cfg, lc, 5);
  testing::ScratchDir dir;
  save_peft_adapter(w, cfg, dir / "a", "base");
  const SafetensorsFile f(dir / "a" / "adapter_model.safetensors");
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  // Expected shapes written out by hand: C = 32, q = 32, kv = 16, I = 48, r = 4.
  std::map<std::string, Shape> want;
  for (int l = 0; l < 3; ++l) {
    const std::string p = "base_model.model.model.layers." + std::to_string(l);
    want[p + ".self_attn.q_proj.lora_A.weight"] = {4, 32};
    want[p + ".self_attn.q_proj.lora_B.weight"] = {32, 4};
    want[p + ".self_attn.k_proj.lora_A.weight"] = {4, 32};
    want[p + ".self_attn.k_proj.lora_B.weight"] = {16, 4};
    want[p + ".self_attn.v_proj.lora_A.weight"] = {4, 32};
    want[p + ".self_attn.v_proj.lora_B.weight"] = {16, 4};
    want[p + ".mlp.down_proj.lora_A.weight"] = {4, 48};
    want[p + ".mlp.down_proj.lora_B.weight"] = {32, 4};
  }
  ASSERT_EQ(f.tensors().size(), want.size());
  for (const auto& t : f.tensors()) {
    ASSERT_EQ(want.count(t.name), 1u) << t.name;
    EXPECT_EQ(t.shape, want.at(t.name)) << t.name;
    EXPECT_EQ(t.dtype, DType::F32) << t.name;
  }
  // The bytes of one tensor are that tensor's values (not a neighbour's).
  const auto* t = f.find("base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(std::memcmp(f.data(*t).data(), w.B(2, LoraTarget::K), 16 * 4 * sizeof(float)), 0);
}

TEST(PeftAdapter, ReplacesAnExistingFolderWholesale) {
  const ModelConfig cfg = testing::tiny_gqa_config(3);
  testing::ScratchDir dir;
  const auto out = dir / "adapter";
  std::filesystem::create_directories(out);
  testing::write_bytes(out / "stale.txt", "old");
  const LoraWeights w = random_lora(cfg, subset_config(), 7);
  save_peft_adapter(w, cfg, out, "base");
  EXPECT_FALSE(std::filesystem::exists(out / "stale.txt"));
  EXPECT_TRUE(std::filesystem::exists(out / "adapter_model.safetensors"));
  // No temporary folders left beside it.
  int entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 1);
}

TEST(PeftAdapter, RejectsAModelConfigThatIsNotTheAdapters) {
  const ModelConfig cfg = testing::tiny_gqa_config(3);
  const LoraWeights w = random_lora(cfg, subset_config(), 8);
  ModelConfig other = cfg;
  other.num_hidden_layers = 4;
  testing::ScratchDir dir;
  const std::string e = testing::error_of([&] { save_peft_adapter(w, other, dir / "a", "base"); });
  EXPECT_NE(e.find((dir / "a").string()), std::string::npos) << e;
  EXPECT_FALSE(std::filesystem::exists(dir / "a"));
}

// A write that fails part way (here: the file size limit, as a full disk
// would) leaves the previous adapter folder as it was and no temporaries.
TEST(PeftAdapter, FailedWriteLeavesTheOldFolder) {
  const ModelConfig cfg = testing::tiny_gqa_config(3);
  testing::ScratchDir dir;
  const auto out = dir / "adapter";
  save_peft_adapter(random_lora(cfg, subset_config(), 8), cfg, out, "base");
  const std::string before = testing::read_bytes(out / "adapter_model.safetensors");
  const LoraWeights w2 = random_lora(cfg, subset_config(), 9);
  {
    FileSizeLimit limit(4096);  // the safetensors file is ~10 KB
    const std::string e = testing::error_of([&] { save_peft_adapter(w2, cfg, out, "base"); });
    EXPECT_NE(e.find("adapter_model.safetensors"), std::string::npos) << e;
  }
  EXPECT_EQ(testing::read_bytes(out / "adapter_model.safetensors"), before);
  int entries = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path())) ++entries;
  EXPECT_EQ(entries, 1);
}

}  // namespace
}  // namespace qlora
