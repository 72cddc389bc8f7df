#include "model/lora.h"

#include <cmath>
#include <fstream>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/tensor_table.h"

namespace qlora {

std::string_view lora_target_module(LoraTarget t) {
  constexpr std::string_view kNames[kNumLoraTargets] = {"q_proj", "k_proj",  "v_proj",   "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"};
  return kNames[int(t)];
}

std::optional<LoraTarget> lora_target_of(TensorKind k) {
  switch (k) {
    case TensorKind::Q:
      return LoraTarget::Q;
    case TensorKind::K:
      return LoraTarget::K;
    case TensorKind::V:
      return LoraTarget::V;
    case TensorKind::O:
      return LoraTarget::O;
    case TensorKind::Gate:
      return LoraTarget::Gate;
    case TensorKind::Up:
      return LoraTarget::Up;
    case TensorKind::Down:
      return LoraTarget::Down;
    default:
      return std::nullopt;
  }
}

float LoraConfig::scale() const {
  return float(rslora ? alpha / std::sqrt(double(rank)) : alpha / double(rank));
}

std::pair<int64_t, int64_t> lora_target_dims(const ModelConfig& cfg, LoraTarget t) {
  const int64_t C = cfg.hidden_size, I = cfg.intermediate_size;
  switch (t) {
    case LoraTarget::Q: return {C, cfg.q_dim()};
    case LoraTarget::K:
    case LoraTarget::V: return {C, cfg.kv_dim()};
    case LoraTarget::O: return {cfg.q_dim(), C};
    case LoraTarget::Gate:
    case LoraTarget::Up: return {C, I};
    case LoraTarget::Down: return {I, C};
  }
  return {0, 0};
}

LoraWeights::LoraWeights(const ModelConfig& cfg, const LoraConfig& lc) : cfg_(cfg), lc_(lc) {
  if (lc.rank <= 0) fail("LoRA rank must be positive, got ", lc.rank);
  if (!(lc.dropout >= 0.0 && lc.dropout < 1.0)) fail("LoRA dropout must be in [0, 1), got ", lc.dropout);
  const ArenaBytes bytes = arena_bytes(cfg, lc);
  params_ = Arena(bytes.params, "LoRA weights");
  grads_ = Arena(bytes.grads, "LoRA gradients");
  layout(params_, grads_, cfg_, lc_, slots_);
}

LoraWeights::ArenaBytes LoraWeights::arena_bytes(const ModelConfig& cfg, const LoraConfig& lc) {
  Arena mp, mg;
  std::vector<Slot> slots;
  layout(mp, mg, cfg, lc, slots);
  return {mp.used(), mg.used()};
}

void LoraWeights::layout(Arena& p, Arena& g, const ModelConfig& cfg, const LoraConfig& lc, std::vector<Slot>& slots) {
  slots.assign(size_t(cfg.num_hidden_layers * kNumLoraTargets), Slot{});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!lc.targets[size_t(t)]) continue;
      const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
      Slot& s = slots[size_t(l * kNumLoraTargets + t)];
      const std::string what(lora_target_module(LoraTarget(t)));
      s.A = p.take<float>(size_t(lc.rank * in), what);
      s.B = p.take<float>(size_t(out * lc.rank), what);
      s.dA = g.take<float>(size_t(lc.rank * in), what);
      s.dB = g.take<float>(size_t(out * lc.rank), what);
    }
}

size_t LoraWeights::num_params() const {
  size_t n = 0;
  for (int t = 0; t < kNumLoraTargets; ++t)
    if (lc_.targets[size_t(t)]) {
      const auto [in, out] = lora_target_dims(cfg_, LoraTarget(t));
      n += size_t(lc_.rank * (in + out));
    }
  return n * size_t(cfg_.num_hidden_layers);
}

void LoraWeights::init_default(uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!lc_.targets[size_t(t)]) continue;
      const auto [in, out] = lora_target_dims(cfg_, LoraTarget(t));
      const float bound = 1.0f / std::sqrt(float(in));
      std::uniform_real_distribution<float> u(-bound, bound);
      float* a = A(l, LoraTarget(t));
      for (int64_t i = 0; i < lc_.rank * in; ++i) a[i] = u(rng);
      std::fill_n(B(l, LoraTarget(t)), out * lc_.rank, 0.0f);
    }
}

std::string LoraWeights::peft_name(int64_t layer, LoraTarget t, bool is_a) const {
  const bool attn = t == LoraTarget::Q || t == LoraTarget::K || t == LoraTarget::V || t == LoraTarget::O;
  return str("base_model.model.model.layers.", layer, attn ? ".self_attn." : ".mlp.", lora_target_module(t),
             is_a ? ".lora_A.weight" : ".lora_B.weight");
}

LoraWeights LoraWeights::load_peft(const std::filesystem::path& dir, const ModelConfig& cfg) {
  const auto cfg_path = dir / "adapter_config.json";
  std::ifstream f(cfg_path);
  if (!f) fail("cannot open ", cfg_path.string());
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    fail(cfg_path.string(), ": invalid JSON: ", e.what());
  }
  LoraConfig lc;
  try {
    lc.rank = j.at("r").get<int64_t>();
    lc.alpha = j.value("lora_alpha", double(lc.rank));
    lc.dropout = j.value("lora_dropout", 0.0);
    lc.rslora = j.value("use_rslora", false);
    lc.targets.fill(false);
    const auto& tm = j.at("target_modules");
    std::set<std::string> names;
    if (tm.is_string()) {
      if (tm.get<std::string>() != "all-linear") fail(cfg_path.string(), ": unsupported target_modules ", tm.dump());
      for (int t = 0; t < kNumLoraTargets; ++t) names.insert(std::string(lora_target_module(LoraTarget(t))));
    } else {
      for (const auto& m : tm) names.insert(m.get<std::string>());
    }
    // PEFT matches a module when its name equals an entry or ends with
    // "." + the entry; it saves "all-linear" expanded to full paths
    // ("model.layers.0.mlp.down_proj"). A path names its kind by its last
    // part; that every layer has the tensors is checked below.
    for (const auto& n : names) {
      const std::string last = n.substr(n.rfind('.') == std::string::npos ? 0 : n.rfind('.') + 1);
      bool found = false;
      for (int t = 0; t < kNumLoraTargets; ++t)
        if (last == lora_target_module(LoraTarget(t))) lc.targets[size_t(t)] = found = true;
      if (!found) fail(cfg_path.string(), ": target module \"", n, "\" is not a Llama block linear");
    }
    // Per-module ranks and alphas (issue 17) are not supported yet: refused
    // by name rather than loaded with the global rank and alpha.
    for (const char* key : {"rank_pattern", "alpha_pattern"})
      if (j.contains(key) && !j.at(key).is_null() && !j.at(key).empty())
        fail(cfg_path.string(), ": ", key, " ", j.at(key).dump(),
             " is not supported (every module must use r and lora_alpha)");
  } catch (const nlohmann::json::exception& e) {
    fail(cfg_path.string(), ": ", e.what());
  }
  LoraWeights w(cfg, lc);
  const SafetensorsModel m(dir / "adapter_model.safetensors");
  std::set<std::string> expected;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!lc.targets[size_t(t)]) continue;
      const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
      for (bool is_a : {true, false}) {
        const std::string name = w.peft_name(l, LoraTarget(t), is_a);
        expected.insert(name);
        const auto* e = m.find(name);
        if (!e) fail(m.source().string(), ": tensor ", name, " is missing (adapter for another model?)");
        const Shape want = is_a ? Shape{lc.rank, in} : Shape{out, lc.rank};
        if (e->info->shape != want)
          fail(m.source().string(), ": tensor ", name, " has shape ", shape_str(e->info->shape), ", expected ",
               shape_str(want), " for this model and r=", lc.rank);
        if (!dtype_is_float(e->info->dtype)) fail(m.source().string(), ": tensor ", name, " is not floating point");
        float* dst = is_a ? w.A(l, LoraTarget(t)) : w.B(l, LoraTarget(t));
        convert_to_f32(m.data(name).data(), e->info->dtype, size_t(e->info->numel()), dst);
        for (int64_t i = 0; i < e->info->numel(); ++i)
          if (!std::isfinite(dst[i])) fail(m.source().string(), ": tensor ", name, " holds NaN/Inf");
      }
    }
  for (const auto& name : m.names())
    if (!expected.count(name)) fail(m.source().string(), ": unexpected tensor ", name, " (adapter for another model?)");
  return w;
}

}  // namespace qlora
