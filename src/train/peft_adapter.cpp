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

nlohmann::ordered_json peft_adapter_config(const LoraConfig& lc, const std::string& base_model_name_or_path) {
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
  j["use_dora"] = lc.dora;
  j["bias"] = "none";
  j["base_model_name_or_path"] = base_model_name_or_path;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["init_lora_weights"] = true;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["revision"] = nullptr;
  // No key of our own: PEFT warns about every key its LoraConfig does not
  // know (tests/interop/test_peft.py checks it stays silent). Keys sorted as
  // PEFT writes them; the patterns keep their own order (the first matching
  // key wins), hence ordered_json.
  j["rank_pattern"] = nlohmann::json::object();
  j["alpha_pattern"] = nlohmann::json::object();
  nlohmann::ordered_json o = nlohmann::ordered_json::parse(j.dump());
  for (const auto& [key, r] : lc.rank_pattern) o["rank_pattern"][key] = r;
  for (const auto& [key, a] : lc.alpha_pattern) {
    if (a == std::floor(a) && std::abs(a) < 9.0e15)
      o["alpha_pattern"][key] = int64_t(a);
    else
      o["alpha_pattern"][key] = a;
  }
  return o;
}

void save_peft_adapter(const LoraWeights& lora, const ModelConfig& cfg, const std::filesystem::path& dir,
                       const std::string& base_model_name_or_path, const std::string& base_fingerprint) {
  const LoraConfig& lc = lora.config();
  // The adapter was laid out for one model; writing it under another's shapes
  // would read past its tensors.
  const size_t expected = LoraWeights::arena_bytes(cfg, lc).params / sizeof(float);
  if (expected != lora.flat_size())
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
      const int64_t R = lora.rank(l, LoraTarget(t));
      items.push_back({{lora.peft_name(l, LoraTarget(t), true), DType::F32, {R, in}}, lora.A(l, LoraTarget(t))});
      items.push_back({{lora.peft_name(l, LoraTarget(t), false), DType::F32, {out, R}}, lora.B(l, LoraTarget(t))});
      if (lc.dora)
        items.push_back({{lora.peft_magnitude_name(l, LoraTarget(t)), DType::F32, {out}}, lora.M(l, LoraTarget(t))});
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
  if (have.dora != want.dora)
    fail(config_file, ": the adapter has use_dora=", have.dora, ", this run uses lora.dora: ", want.dora);
  // Patterns compared by their effect: every module's rank and alpha.
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!want.targets[size_t(t)]) continue;
      const LoraTarget tt = LoraTarget(t);
      if (loaded.rank(l, tt) != like.rank(l, tt) || loaded.alpha(l, tt) != like.alpha(l, tt))
        fail(config_file, ": module ", lora_module_name(l, tt), " has r=", loaded.rank(l, tt),
             " lora_alpha=", loaded.alpha(l, tt), " in the adapter (rank_pattern/alpha_pattern), this run uses r=",
             like.rank(l, tt), " lora_alpha=", like.alpha(l, tt));
    }
  if (loaded.flat_size() != like.flat_size())
    fail(dir.string(), ": adapter holds ", loaded.flat_size(), " values, expected ", like.flat_size());
  return loaded;
}

}  // namespace qlora
