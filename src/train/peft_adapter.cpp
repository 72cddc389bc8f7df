#include "train/peft_adapter.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "io/safetensors.h"

namespace qlora {

const char* qlora_version() {
#ifdef QLORA_VERSION_STRING
  return QLORA_VERSION_STRING;
#else
  return "0.1.0";  // keep equal to project(VERSION) in CMakeLists.txt
#endif
}

nlohmann::json peft_adapter_config(const LoraConfig& lc, const std::string& base_model_name_or_path) {
  std::vector<std::string> targets;
  for (int t = 0; t < kNumLoraTargets; ++t)
    if (lc.targets[size_t(t)]) targets.emplace_back(lora_target_module(LoraTarget(t)));
  std::sort(targets.begin(), targets.end());
  nlohmann::json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["r"] = lc.rank;
  // PEFT declares lora_alpha an int; write one when the value is whole so
  // strict loaders see the type they expect (a fraction stays a float).
  if (lc.alpha == std::floor(lc.alpha) && std::abs(lc.alpha) < 9.0e15)
    j["lora_alpha"] = int64_t(lc.alpha);
  else
    j["lora_alpha"] = lc.alpha;
  j["lora_dropout"] = lc.dropout;
  j["target_modules"] = targets;
  j["use_rslora"] = lc.rslora;
  j["use_dora"] = false;
  j["bias"] = "none";
  j["base_model_name_or_path"] = base_model_name_or_path;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["rank_pattern"] = nlohmann::json::object();
  j["alpha_pattern"] = nlohmann::json::object();
  j["revision"] = nullptr;
  // No key of our own: PEFT warns about every key its LoraConfig does not
  // know (tests/interop/test_peft.py checks it stays silent).
  return j;
}

void save_peft_adapter(const LoraWeights& lora, const ModelConfig& cfg, const std::filesystem::path& dir,
                       const std::string& base_model_name_or_path, const std::string& base_fingerprint) {
  const LoraConfig& lc = lora.config();
  // The adapter was laid out for one model; writing it under another's shapes
  // would read past its tensors.
  size_t expected = 0;
  for (int t = 0; t < kNumLoraTargets; ++t)
    if (lora.has(LoraTarget(t))) {
      const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
      expected += size_t(lc.rank * (in + out) * cfg.num_hidden_layers);
    }
  if (expected != lora.num_params())
    fail(dir.string(), ": the LoRA adapter holds ", lora.num_params(), " values, but this model config (",
         cfg.num_hidden_layers, " layers) needs ", expected);
  // Sorted by name, as safetensors' own writer orders equal-dtype tensors.
  struct Item {
    TensorSpec spec;
    const float* data;
  };
  std::vector<Item> items;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!lora.has(LoraTarget(t))) continue;
      const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
      items.push_back(
          {{lora.peft_name(l, LoraTarget(t), true), DType::F32, {lc.rank, in}}, lora.A(l, LoraTarget(t))});
      items.push_back(
          {{lora.peft_name(l, LoraTarget(t), false), DType::F32, {out, lc.rank}}, lora.B(l, LoraTarget(t))});
    }
  if (items.empty()) fail(dir.string(), ": the LoRA adapter has no target modules; nothing to save");
  std::sort(items.begin(), items.end(),
            [](const Item& a, const Item& b) { return a.spec.name < b.spec.name; });
  std::vector<TensorSpec> specs;
  for (const auto& it : items) specs.push_back(it.spec);

  AtomicDir out(dir, /*replace=*/true);
  write_file_atomic(out.path() / "adapter_config.json",
                    peft_adapter_config(lc, base_model_name_or_path).dump(2) + "\n");
  std::map<std::string, std::string> metadata{{"format", "pt"}};
  if (!base_fingerprint.empty()) metadata[kAdapterFingerprintKey] = base_fingerprint;
  SafetensorsWriter w(out.path() / "adapter_model.safetensors", specs, metadata);
  for (const auto& it : items) w.write(it.data, size_t(it.spec.nbytes()));
  w.commit();
  out.commit();
}

LoraWeights load_matching_adapter(const std::filesystem::path& dir, const LoraWeights& like,
                                  const ModelConfig& cfg) {
  const std::string config_file = (dir / "adapter_config.json").string();
  LoraWeights loaded = LoraWeights::load_peft(dir, cfg);
  const LoraConfig &have = loaded.config(), &want = like.config();
  if (have.rank != want.rank)
    fail(config_file, ": the adapter has LoRA rank r=", have.rank, ", this run uses r=", want.rank);
  auto names = [](const LoraConfig& c) {
    std::string list;
    for (int t = 0; t < kNumLoraTargets; ++t)
      if (c.targets[size_t(t)]) list += str(list.empty() ? "" : " ", lora_target_module(LoraTarget(t)));
    return list;
  };
  if (have.targets != want.targets)
    fail(config_file, ": the adapter adapts [", names(have), "], this run targets [", names(want), "]");
  if (have.alpha != want.alpha || have.rslora != want.rslora)
    fail(config_file, ": the adapter has lora_alpha=", have.alpha, " use_rslora=", have.rslora,
         ", this run uses lora_alpha=", want.alpha, " use_rslora=", want.rslora);
  if (loaded.flat_size() != like.flat_size())
    fail(dir.string(), ": adapter holds ", loaded.flat_size(), " values, expected ", like.flat_size());
  return loaded;
}

}  // namespace qlora
