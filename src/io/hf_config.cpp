// config.json -> ModelConfig.
//
// Defaults follow the transformers configuration classes (LlamaConfig,
// MistralConfig, Qwen2Config, Qwen3Config) so that a config.json that omits a key means the
// same thing here as it does to transformers. JSON null is treated as "absent"
// for every optional key, as the Python constructors do (`x=None` -> default),
// except the token ids, where null means "no such token".
#include "io/hf_config.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/json_integer.h"
#include "core/json_parse.h"
#include "io/gguf_config.h"

namespace qlora {

using nlohmann::json;

std::string_view arch_name(Arch a) {
  switch (a) {
    case Arch::Llama:
      return "llama";
    case Arch::Mistral:
      return "mistral";
    case Arch::Qwen2:
      return "qwen2";
    case Arch::Qwen3:
      return "qwen3";
  }
  return "?";
}

std::string_view rope_scaling_name(RopeScalingType t) {
  switch (t) {
    case RopeScalingType::None:
      return "none";
    case RopeScalingType::Linear:
      return "linear";
    case RopeScalingType::Llama3:
      return "llama3";
  }
  return "?";
}

namespace {

// A JSON value as it should appear in an error message; long values (a whole
// object by mistake) are cut so the message stays one readable line.
std::string show(const json& v) {
  // dump() recurses: a value nested thousands deep (a hostile file) would
  // overflow the stack, so only shallow values are printed.
  std::vector<std::pair<const json*, int>> todo{{&v, 0}};
  while (!todo.empty()) {
    const auto [x, depth] = todo.back();
    todo.pop_back();
    if (depth > 32) return v.is_array() ? "[...]" : "{...}";
    if (x->is_structured())
      for (const auto& child : *x) todo.emplace_back(&child, depth + 1);
  }
  std::string s = v.dump();
  constexpr size_t kMax = 60;
  if (s.size() > kMax) s = s.substr(0, kMax) + "...";
  return s;
}

// Typed access to the keys of one JSON object. `prefix` qualifies nested keys
// in messages ("rope_scaling.factor") so the user can find them in the file.
class Keys {
 public:
  Keys(const json& obj, std::string_view source, std::string prefix = "")
      : obj_(obj), source_(source), prefix_(std::move(prefix)) {}

  // nullptr when the key is absent or null.
  const json* find(std::string_view key) const {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  bool has(std::string_view key) const { return find(key) != nullptr; }

  [[noreturn]] void wrong(std::string_view key, std::string_view expected, const json& got) const {
    fail(source_, ": \"", prefix_, key, "\" must be ", expected, ", got ", show(got));
  }
  [[noreturn]] void missing(std::string_view key, std::string_view expected) const {
    fail(source_, ": missing required key \"", prefix_, key, "\" (", expected, ")");
  }

  int64_t req_positive_int(std::string_view key) const {
    const json* v = find(key);
    if (!v) missing(key, "a positive integer");
    return positive_int(key, *v);
  }
  int64_t opt_positive_int(std::string_view key, int64_t def) const {
    const json* v = find(key);
    return v ? positive_int(key, *v) : def;
  }
  double req_positive_number(std::string_view key) const {
    const json* v = find(key);
    if (!v) missing(key, "a positive number");
    return positive_number(key, *v);
  }
  double opt_positive_number(std::string_view key, double def) const {
    const json* v = find(key);
    return v ? positive_number(key, *v) : def;
  }
  bool opt_bool(std::string_view key, bool def) const {
    const json* v = find(key);
    if (!v) return def;
    if (!v->is_boolean()) wrong(key, "true or false", *v);
    return v->get<bool>();
  }
  std::string opt_string(std::string_view key, std::string def) const {
    const json* v = find(key);
    if (!v) return def;
    if (!v->is_string()) wrong(key, "a string", *v);
    return v->get<std::string>();
  }
  // int, list of ints, null (-> none) or absent (-> def). Token ids may be 0.
  // Unlike other keys, null is not "absent" here: it is how a config says the
  // model has no such token, and the class default must not replace it.
  std::vector<int64_t> opt_token_ids(std::string_view key, std::vector<int64_t> def) const {
    if (!obj_.contains(key)) return def;
    const json* v = find(key);
    if (!v) return {};
    constexpr std::string_view kWhat = "a token id or a list of token ids";
    std::vector<int64_t> out;
    if (v->is_array()) {
      for (const json& e : *v) {
        int64_t id = 0;
        if (!as_int(e, id) || id < 0) wrong(key, kWhat, *v);
        out.push_back(id);
      }
      return out;
    }
    int64_t id = 0;
    if (!as_int(*v, id) || id < 0) wrong(key, kWhat, *v);
    return {id};
  }

 private:
  // Integers only: 4096.0 is rejected, as transformers would fail later on it.
  static bool as_int(const json& v, int64_t& out) {
    if (v.is_number_unsigned()) {
      uint64_t u = v.get<uint64_t>();
      if (u > uint64_t(std::numeric_limits<int64_t>::max())) return false;
      out = int64_t(u);
      return true;
    }
    if (v.is_number_integer()) {
      out = v.get<int64_t>();
      return true;
    }
    return false;
  }
  int64_t positive_int(std::string_view key, const json& v) const {
    int64_t x = 0;
    if (!as_int(v, x) || x <= 0) wrong(key, "a positive integer", v);
    return x;
  }
  double positive_number(std::string_view key, const json& v) const {
    if (!v.is_number() || !(v.get<double>() > 0)) wrong(key, "a positive number", v);
    return v.get<double>();
  }

  const json& obj_;
  std::string_view source_;
  std::string prefix_;
};

constexpr std::string_view kSupportedArchs = "llama, mistral, qwen2, qwen3";

Arch parse_arch(const json& j, std::string_view source) {
  auto it = j.find("model_type");
  if (it == j.end() || it->is_null())
    fail(source, ": missing \"model_type\" (supported: ", kSupportedArchs, ")");
  if (!it->is_string()) fail(source, ": \"model_type\" must be a string, got ", show(*it));
  const std::string mt = it->get<std::string>();
  if (mt == "llama") return Arch::Llama;
  if (mt == "mistral") return Arch::Mistral;
  if (mt == "qwen2") return Arch::Qwen2;
  if (mt == "qwen3") return Arch::Qwen3;
  fail(source, ": model_type \"", mt, "\" is not supported (supported: ", kSupportedArchs, ")");
}

// rope_scaling (or the rope_parameters object of newer transformers, which
// also carries rope_theta). The type is "rope_type", or "type" in configs
// written before transformers 4.43.
RopeScaling parse_rope_scaling(const json& rs, std::string_view source, const std::string& key) {
  if (!rs.is_object()) fail(source, ": \"", key, "\" must be an object or null, got ", show(rs));
  Keys k(rs, source, key + ".");
  std::string type;
  if (k.has("rope_type"))
    type = k.opt_string("rope_type", "");
  else if (k.has("type"))
    type = k.opt_string("type", "");
  else
    fail(source, ": \"", key, "\" has no \"rope_type\" (or \"type\")");

  RopeScaling out;
  if (type == "default") return out;  // plain RoPE, factor unused
  if (type == "linear") {
    out.type = RopeScalingType::Linear;
    out.factor = k.req_positive_number("factor");
    return out;
  }
  if (type == "llama3") {
    out.type = RopeScalingType::Llama3;
    out.factor = k.req_positive_number("factor");
    out.low_freq_factor = k.req_positive_number("low_freq_factor");
    out.high_freq_factor = k.req_positive_number("high_freq_factor");
    out.original_max_position_embeddings = k.req_positive_int("original_max_position_embeddings");
    // The llama3 formula interpolates between the two wavelength bounds; equal
    // or swapped factors would divide by zero or invert the ramp.
    if (!(out.high_freq_factor > out.low_freq_factor))
      fail(source, ": \"", key, ".high_freq_factor\" (", out.high_freq_factor, ") must be greater than \"",
           key, ".low_freq_factor\" (", out.low_freq_factor, ")");
    return out;
  }
  fail(source, ": ", key, " type \"", type, "\" is not supported (supported: none, linear, llama3)");
}

std::optional<BnbQuantConfig> parse_quantization(const json& q, std::string_view source) {
  const std::string key = "quantization_config";
  if (!q.is_object()) fail(source, ": \"", key, "\" must be an object, got ", show(q));
  Keys k(q, source, key + ".");
  constexpr std::string_view kOnly = "only bitsandbytes 4-bit checkpoints are supported";

  const bool in4 = k.opt_bool("load_in_4bit", false) || k.opt_bool("_load_in_4bit", false);
  const bool in8 = k.opt_bool("load_in_8bit", false) || k.opt_bool("_load_in_8bit", false);
  // Configs from before quant_method existed only carry the load_in_* flags;
  // transformers reads those as bitsandbytes, and so do we.
  std::string method = k.opt_string("quant_method", (in4 || in8) ? "bitsandbytes" : "");
  if (method.empty()) fail(source, ": \"", key, "\" has no \"quant_method\"; ", kOnly);
  if (method != "bitsandbytes") fail(source, ": quant_method \"", method, "\" is not supported; ", kOnly);
  if (in8 || !in4)
    fail(source, ": ", key, " is bitsandbytes ", in8 ? "8-bit" : "without load_in_4bit", "; ", kOnly);

  // Absent keys take BitsAndBytesConfig's defaults (fp4, no double quant,
  // float32 compute), not QLoRA's: that is what bitsandbytes actually did to
  // the weights of a checkpoint whose config omits them.
  BnbQuantConfig out;
  out.quant_type = k.opt_string("bnb_4bit_quant_type", "fp4");
  if (out.quant_type != "nf4" && out.quant_type != "fp4")
    fail(source, ": \"", key, ".bnb_4bit_quant_type\" must be \"nf4\" or \"fp4\", got \"", out.quant_type,
         "\"");
  out.double_quant = k.opt_bool("bnb_4bit_use_double_quant", false);
  out.compute_dtype = k.opt_string("bnb_4bit_compute_dtype", "float32");
  out.quant_storage = k.opt_string("bnb_4bit_quant_storage", "uint8");
  if (const json* skip = k.find("llm_int8_skip_modules")) {
    if (!skip->is_array()) k.wrong("llm_int8_skip_modules", "a list of module names or null", *skip);
    for (const json& m : *skip) {
      if (!m.is_string()) k.wrong("llm_int8_skip_modules", "a list of module names or null", *skip);
      out.skip_modules.push_back(m.get<std::string>());
    }
  }
  return out;
}

// Qwen2Config / Qwen3Config: configs always carry a sliding_window value; it
// applies only when use_sliding_window is set, and then only to the layers
// layer_types marks "sliding_attention" (default: index >= max_window_layers).
// `window` is config.json's sliding_window (null: none; absent: 4096).
void qwen_sliding_window(ModelConfig& c, const Keys& k, std::optional<int64_t> window) {
  if (!k.opt_bool("use_sliding_window", false) || !window) return;
  c.sliding_window = window;
  const int64_t L = c.num_hidden_layers;
  c.sliding_layers.assign(size_t(L), false);
  if (const json* types = k.find("layer_types")) {
    constexpr std::string_view kWhat = "a list of \"full_attention\" / \"sliding_attention\", one per layer";
    if (!types->is_array() || int64_t(types->size()) != L) k.wrong("layer_types", kWhat, *types);
    for (int64_t l = 0; l < L; ++l) {
      const json& t = (*types)[size_t(l)];
      if (t == "sliding_attention")
        c.sliding_layers[size_t(l)] = true;
      else if (t != "full_attention")
        k.wrong("layer_types", kWhat, *types);
    }
  } else {
    // max_window_layers may be 0 (every layer slides); the class default is 28.
    int64_t first = 28;
    if (const json* m = k.find("max_window_layers")) {
      const auto n = json_integer_within(*m, 0, INT64_MAX);
      if (!n) k.wrong("max_window_layers", "an integer >= 0", *m);
      first = *n;
    }
    for (int64_t l = first; l < L; ++l) c.sliding_layers[size_t(l)] = true;
  }
  if (std::find(c.sliding_layers.begin(), c.sliding_layers.end(), true) == c.sliding_layers.end()) {
    // No layer slides: full attention everywhere, as transformers computes it.
    c.sliding_window.reset();
    c.sliding_layers.clear();
  }
}

}  // namespace

ModelConfig parse_model_config(const json& j, std::string_view source) {
  if (!j.is_object()) fail(source, ": expected a JSON object at the top level, got ", show(j));
  Keys k(j, source);
  ModelConfig c;
  c.arch = parse_arch(j, source);
  c.model_type = j.at("model_type").get<std::string>();

  c.vocab_size = k.req_positive_int("vocab_size");
  c.hidden_size = k.req_positive_int("hidden_size");
  c.intermediate_size = k.req_positive_int("intermediate_size");
  c.num_hidden_layers = k.req_positive_int("num_hidden_layers");
  c.num_attention_heads = k.req_positive_int("num_attention_heads");
  c.num_key_value_heads = k.opt_positive_int("num_key_value_heads", c.num_attention_heads);

  // An explicit head_dim may differ from hidden_size / heads (Mistral-Nemo:
  // 5120 / 32 = 160 but head_dim 128); only the derived one must divide evenly.
  if (k.has("head_dim")) {
    c.head_dim = k.opt_positive_int("head_dim", 0);
  } else {
    if (c.hidden_size % c.num_attention_heads != 0)
      fail(source, ": hidden_size (", c.hidden_size, ") is not divisible by num_attention_heads (",
           c.num_attention_heads, ") and no head_dim is given");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail(source, ": num_attention_heads (", c.num_attention_heads,
         ") is not divisible by num_key_value_heads (", c.num_key_value_heads, "): GQA groups must be whole");

  // transformers defaults: LlamaConfig 2048, MistralConfig 4096 * 32, Qwen2Config and Qwen3Config 32768.
  int64_t default_max_pos = 2048;
  if (c.arch == Arch::Mistral) default_max_pos = 4096 * 32;
  if (c.arch == Arch::Qwen2 || c.arch == Arch::Qwen3) default_max_pos = 32768;
  c.max_position_embeddings = k.opt_positive_int("max_position_embeddings", default_max_pos);
  c.rms_norm_eps = k.opt_positive_number("rms_norm_eps", 1e-6);

  // Newer transformers nest rope_theta and the scaling in "rope_parameters";
  // the top-level keys win when both are present.
  const json* rope_params = k.find("rope_parameters");
  if (rope_params && !rope_params->is_object()) k.wrong("rope_parameters", "an object or null", *rope_params);
  double theta_default = 10000.0;
  if (rope_params)
    theta_default =
        Keys(*rope_params, source, "rope_parameters.").opt_positive_number("rope_theta", theta_default);
  c.rope_theta = k.opt_positive_number("rope_theta", theta_default);
  if (const json* rs = k.find("rope_scaling"))
    c.rope_scaling = parse_rope_scaling(*rs, source, "rope_scaling");
  else if (rope_params)
    c.rope_scaling = parse_rope_scaling(*rope_params, source, "rope_parameters");

  c.tie_word_embeddings = k.opt_bool("tie_word_embeddings", false);

  // sliding_window: absent -> the class default, null -> full attention.
  auto window = [&](std::optional<int64_t> absent) -> std::optional<int64_t> {
    if (!j.contains("sliding_window")) return absent;
    if (!k.has("sliding_window")) return std::nullopt;
    return k.opt_positive_int("sliding_window", 0);
  };
  switch (c.arch) {
    case Arch::Llama:
      c.attention_bias = k.opt_bool("attention_bias", false);
      c.mlp_bias = k.opt_bool("mlp_bias", false);
      break;
    case Arch::Mistral:
      // MistralAttention has no bias option; MistralConfig's window default is 4096.
      c.sliding_window = window(4096);
      break;
    case Arch::Qwen2:
      // Qwen2Attention always has q/k/v biases (o_proj none), whatever the config says.
      c.attention_bias = true;
      qwen_sliding_window(c, k, window(4096));
      break;
    case Arch::Qwen3:
      // Qwen3Attention: biases on all four projections when attention_bias
      // (false in every published Qwen3), q_norm/k_norm always.
      c.attention_bias = k.opt_bool("attention_bias", false);
      c.qk_norm = true;
      qwen_sliding_window(c, k, window(4096));
      break;
  }

  // Newer configs write "dtype" instead of "torch_dtype"; with neither,
  // transformers loads in float32.
  c.torch_dtype = k.opt_string("torch_dtype", k.opt_string("dtype", "float32"));

  // PretrainedConfig leaves the ids unset; Llama/Mistral configs default to 1 and 2.
  const bool sp_defaults = c.arch != Arch::Qwen2 && c.arch != Arch::Qwen3;
  c.bos_token_ids =
      k.opt_token_ids("bos_token_id", sp_defaults ? std::vector<int64_t>{1} : std::vector<int64_t>{});
  c.eos_token_ids =
      k.opt_token_ids("eos_token_id", sp_defaults ? std::vector<int64_t>{2} : std::vector<int64_t>{});

  if (const json* q = k.find("quantization_config")) c.quantization = parse_quantization(*q, source);
  return c;
}

ModelConfig load_model_config(const std::filesystem::path& dir_or_file) {
  namespace fs = std::filesystem;
  std::error_code ec;
  // A GGUF model carries its configuration in its metadata (io/gguf_config).
  if (is_gguf_file(dir_or_file)) return gguf_model_config(GgufFile(dir_or_file));
  fs::path file = dir_or_file;
  if (fs::is_directory(dir_or_file, ec)) {
    file = dir_or_file / "config.json";
    if (!fs::exists(file, ec)) fail(dir_or_file.string(), ": no config.json");
  } else if (!fs::exists(dir_or_file, ec)) {
    fail(dir_or_file.string(), ": cannot open: no such file or folder");
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(file.string(), ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) fail(file.string(), ": read error");

  json j;
  try {
    j = parse_json(text.str(), file.string());
  } catch (const json::exception& e) {
    fail(file.string(), ": invalid JSON: ", e.what());
  }
  return parse_model_config(j, file.string());
}

}  // namespace qlora
