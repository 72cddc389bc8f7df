#include "model/lora.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>
#include <set>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_integer.h"
#include "core/json_parse.h"
#include "io/safetensors.h"
#include "model/tensor_table.h"
#include "tokenizer/regex.h"

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

std::string lora_module_name(int64_t layer, LoraTarget t) {
  const bool attn = t == LoraTarget::Q || t == LoraTarget::K || t == LoraTarget::V || t == LoraTarget::O;
  return str("model.layers.", layer, attn ? ".self_attn." : ".mlp.", lora_target_module(t));
}

namespace {

// For each module, the index of the first key that matches it (PEFT's
// get_pattern_key: re.match(rf"(.*\.)?({key})$", name), keys in order), or
// -1. PCRE2 stands in for Python's re: the same syntax for what module
// patterns use (literals, ".", classes, groups, alternation, repeats).
template <typename V>
std::vector<int> match_patterns(const ModelConfig& cfg, const std::vector<std::pair<std::string, V>>& pattern,
                                const char* key_name) {
  const int64_t L = cfg.num_hidden_layers;
  std::vector<int> first(size_t(L * kNumLoraTargets), -1);
  for (size_t k = 0; k < pattern.size(); ++k) {
    const std::string& key = pattern[k].first;
    const tok::Regex re(str("\\A(.*\\.)?(", key, ")$"), str(key_name, " key '", key, "'"));
    bool any = false;
    std::vector<std::pair<size_t, size_t>> spans;
    for (int64_t l = 0; l < L; ++l)
      for (int t = 0; t < kNumLoraTargets; ++t) {
        const std::string name = lora_module_name(l, LoraTarget(t));
        spans.clear();
        re.find_all(name, 0, name.size(), spans);
        if (spans.empty()) continue;
        any = true;
        int& f = first[size_t(l * kNumLoraTargets + t)];
        if (f < 0) f = int(k);
      }
    if (!any)
      fail(key_name, " key '", key, "' matches no module of this model; the modules are model.layers.N.self_attn."
           "{q,k,v,o}_proj and model.layers.N.mlp.{gate,up,down}_proj for N in 0..", L - 1,
           " (a key matches a name's last parts, e.g. down_proj or layers.0.mlp.down_proj)");
  }
  return first;
}

}  // namespace

std::vector<LoraModuleParams> lora_module_params(const ModelConfig& cfg, const LoraConfig& lc) {
  const std::vector<int> r = match_patterns(cfg, lc.rank_pattern, "rank_pattern");
  const std::vector<int> a = match_patterns(cfg, lc.alpha_pattern, "alpha_pattern");
  for (const auto& [key, v] : lc.rank_pattern)
    if (v < 1) fail("rank_pattern key '", key, "': the rank must be at least 1, got ", v);
  for (const auto& [key, v] : lc.alpha_pattern)
    if (!(v > 0.0) || !std::isfinite(v)) fail("alpha_pattern key '", key, "': alpha must be a number > 0, got ", v);
  std::vector<LoraModuleParams> out(r.size());
  for (size_t i = 0; i < out.size(); ++i) {
    LoraModuleParams& p = out[i];
    p.rank = r[i] < 0 ? lc.rank : lc.rank_pattern[size_t(r[i])].second;
    p.alpha = a[i] < 0 ? lc.alpha : lc.alpha_pattern[size_t(a[i])].second;
    p.scale = float(lc.rslora ? p.alpha / std::sqrt(double(p.rank)) : p.alpha / double(p.rank));
  }
  return out;
}

int64_t lora_max_rank(const ModelConfig& cfg, const LoraConfig& lc, LoraTarget t) {
  if (!lc.targets[size_t(t)]) return 0;
  if (lc.rank_pattern.empty()) return lc.rank;
  const auto params = lora_module_params(cfg, lc);
  int64_t m = 0;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    m = std::max(m, params[size_t(l * kNumLoraTargets + int64_t(t))].rank);
  return m;
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

// Per adapted linear, in layer then target order: A, B, then (DoRA) M.
void LoraWeights::layout(Arena& p, Arena& g, const ModelConfig& cfg, const LoraConfig& lc, std::vector<Slot>& slots) {
  const std::vector<LoraModuleParams> mp = lora_module_params(cfg, lc);
  slots.assign(size_t(cfg.num_hidden_layers * kNumLoraTargets), Slot{});
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!lc.targets[size_t(t)]) continue;
      const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
      const size_t i = size_t(l * kNumLoraTargets + t);
      Slot& s = slots[i];
      s.rank = mp[i].rank;
      s.alpha = mp[i].alpha;
      s.scale = mp[i].scale;
      const std::string what(lora_target_module(LoraTarget(t)));
      s.A = p.take<float>(size_t(s.rank * in), what);
      s.B = p.take<float>(size_t(out * s.rank), what);
      if (lc.dora) s.M = p.take<float>(size_t(out), what);
      s.dA = g.take<float>(size_t(s.rank * in), what);
      s.dB = g.take<float>(size_t(out * s.rank), what);
      if (lc.dora) s.dM = g.take<float>(size_t(out), what);
    }
}

size_t LoraWeights::num_params() const {
  size_t n = 0;
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      if (lc_.targets[size_t(t)]) {
        const auto [in, out] = lora_target_dims(cfg_, LoraTarget(t));
        n += size_t(rank(l, LoraTarget(t)) * (in + out) + (lc_.dora ? out : 0));
      }
  return n;
}

int64_t LoraWeights::max_rank() const {
  int64_t r = 0;
  for (const Slot& s : slots_) r = std::max(r, s.rank);
  return r;
}

std::vector<FlatRange> LoraWeights::plus_ranges() const {
  std::vector<FlatRange> r;
  const float* base = flat_params();
  for (int64_t l = 0; l < cfg_.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!lc_.targets[size_t(t)]) continue;
      const Slot& s = slot(l, LoraTarget(t));
      const int64_t out = lora_target_dims(cfg_, LoraTarget(t)).second;
      r.push_back({size_t(s.B - base), size_t(s.B - base) + size_t(out * s.rank)});
      if (s.M) r.push_back({size_t(s.M - base), size_t(s.M - base) + size_t(out)});
    }
  return r;
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
      const int64_t R = rank(l, LoraTarget(t));
      for (int64_t i = 0; i < R * in; ++i) a[i] = u(rng);
      std::fill_n(B(l, LoraTarget(t)), out * R, 0.0f);
    }
}

std::string LoraWeights::peft_name(int64_t layer, LoraTarget t, bool is_a) const {
  return str("base_model.model.", lora_module_name(layer, t), is_a ? ".lora_A.weight" : ".lora_B.weight");
}

std::string LoraWeights::peft_magnitude_name(int64_t layer, LoraTarget t) const {
  return str("base_model.model.", lora_module_name(layer, t), ".lora_magnitude_vector");
}

LoraWeights LoraWeights::load_peft(const std::filesystem::path& dir, const ModelConfig& cfg) {
  const auto cfg_path = dir / "adapter_config.json";
  std::ifstream f(cfg_path);
  if (!f) fail("cannot open ", cfg_path.string());
  // ordered_json: a pattern's position decides which key wins, as in PEFT.
  nlohmann::ordered_json j;
  try {
    j = parse_json<nlohmann::ordered_json>(f, cfg_path.string());
  } catch (const nlohmann::json::exception& e) {
    fail(cfg_path.string(), ": invalid JSON: ", e.what());
  }
  LoraConfig lc;
  try {
    lc.rank = json_integer<int64_t>(j.at("r"), cfg_path.string() + ": \"r\"");
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
    // Per-module ranks and alphas, in file order (the first matching key wins).
    if (j.contains("rank_pattern") && !j.at("rank_pattern").is_null())
      for (const auto& [key, v] : j.at("rank_pattern").items()) {
        if (!v.is_number_integer()) fail(cfg_path.string(), ": rank_pattern[\"", key, "\"] must be an integer, got ", v.dump());
        lc.rank_pattern.emplace_back(key, json_integer<int64_t>(v, cfg_path.string() + ": rank_pattern[\"" + key + "\"]"));
      }
    if (j.contains("alpha_pattern") && !j.at("alpha_pattern").is_null())
      for (const auto& [key, v] : j.at("alpha_pattern").items()) {
        if (!v.is_number()) fail(cfg_path.string(), ": alpha_pattern[\"", key, "\"] must be a number, got ", v.dump());
        lc.alpha_pattern.emplace_back(key, v.get<double>());
      }
    lc.dora = j.contains("use_dora") && !j.at("use_dora").is_null() && j.at("use_dora").get<bool>();
  } catch (const nlohmann::json::exception& e) {
    fail(cfg_path.string(), ": ", e.what());
  }
  std::optional<LoraWeights> made;
  try {
    made.emplace(cfg, lc);
  } catch (const Error& e) {
    fail(cfg_path.string(), ": ", e.what());
  }
  LoraWeights& w = *made;
  const SafetensorsModel m(dir / "adapter_model.safetensors");
  std::set<std::string> expected;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      if (!lc.targets[size_t(t)]) continue;
      const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
      const int64_t R = w.rank(l, LoraTarget(t));
      for (int part = 0; part < (lc.dora ? 3 : 2); ++part) {
        const bool is_a = part == 0;
        const std::string name = part == 2 ? w.peft_magnitude_name(l, LoraTarget(t)) : w.peft_name(l, LoraTarget(t), is_a);
        expected.insert(name);
        const auto* e = m.find(name);
        if (!e)
          fail(m.source().string(), ": tensor ", name, " is missing (",
               part == 2 ? "use_dora is true in adapter_config.json" : "adapter for another model?", ")");
        const Shape want = part == 2 ? Shape{out} : is_a ? Shape{R, in} : Shape{out, R};
        if (e->info->shape != want)
          fail(m.source().string(), ": tensor ", name, " has shape ", shape_str(e->info->shape), ", expected ",
               shape_str(want), " for this model and r=", R);
        if (!dtype_is_float(e->info->dtype)) fail(m.source().string(), ": tensor ", name, " is not floating point");
        float* dst = part == 2 ? w.M(l, LoraTarget(t)) : is_a ? w.A(l, LoraTarget(t)) : w.B(l, LoraTarget(t));
        convert_to_f32(m.data(name).data(), e->info->dtype, size_t(e->info->numel()), dst);
        for (int64_t i = 0; i < e->info->numel(); ++i)
          if (!std::isfinite(dst[i])) fail(m.source().string(), ": tensor ", name, " holds NaN/Inf");
      }
    }
  for (const auto& name : m.names())
    if (!expected.count(name))
      fail(m.source().string(), ": unexpected tensor ", name,
           name.find("lora_magnitude_vector") != std::string::npos
               ? " (a DoRA magnitude, but adapter_config.json does not say use_dora: true)"
               : " (adapter for another model?)");
  return std::move(w);
}

}  // namespace qlora
