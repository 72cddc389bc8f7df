// GGUF metadata -> config.json. The key names are llama.cpp's (LLM_KV_* in
// its llama-arch.cpp): "<arch>.block_count", "<arch>.attention.head_count", ...
#include "io/gguf_config.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <numbers>
#include <string>
#include <vector>

#include "core/error.h"

namespace qlora {

using nlohmann::json;

namespace {

// GGUF stores these as f32; config.json as the short decimal a person wrote
// (1e-05, not 9.999999747378752e-06). The shortest decimal that reads back as
// the same f32 is that number, and it rounds to the same fp32 in our math.
double short_decimal(double v) {
  const float f = float(v);
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, f);
  return std::strtod(std::string(buf, r.ptr).c_str(), nullptr);
}

// transformers' llama3 inverse-frequency factors (what llama.cpp's converter
// stores in rope_freqs.weight: inv_freq / factor_j), in double.
std::vector<double> llama3_factors(double theta, int64_t D, double factor, double lo, double hi,
                                   double old_ctx) {
  std::vector<double> out;
  for (int64_t j = 0; j < D / 2; ++j) {
    const double f = 1.0 / std::pow(theta, double(2 * j) / double(D));
    const double wavelen = 2.0 * std::numbers::pi / f;
    if (wavelen < old_ctx / hi) {
      out.push_back(1.0);
    } else if (wavelen > old_ctx / lo) {
      out.push_back(factor);
    } else {
      const double smooth = (old_ctx / wavelen - lo) / (hi - lo);
      out.push_back(1.0 / ((1.0 - smooth) / factor + smooth));
    }
  }
  return out;
}

// Llama 3.1+ GGUFs carry RoPE scaling as a tensor of per-frequency factors,
// not as metadata. The published Llama 3 parameters (low 1, high 4, original
// context 8192, factor = the largest stored factor) are recovered by checking
// that they reproduce every stored factor; anything else is refused.
json llama3_scaling_from_rope_freqs(const GgufFile& f, const GgufTensorInfo& t, double theta,
                                    int64_t head_dim) {
  const std::string where = f.path().string() + ": tensor " + t.name;
  if (t.type != GgmlType::F32) fail(where, ": expected F32, got ", ggml_type_name(t.type));
  if (t.numel() != head_dim / 2)
    fail(where, ": expected ", head_dim / 2, " factors (head_dim / 2), got ", t.numel());
  const auto bytes = f.data(t);
  std::vector<float> stored(size_t(t.numel()));
  std::memcpy(stored.data(), bytes.data(), stored.size() * sizeof(float));
  double factor = 0;
  for (float v : stored) factor = std::max(factor, double(v));
  constexpr double kLo = 1.0, kHi = 4.0, kOldCtx = 8192.0;
  const std::vector<double> want = llama3_factors(theta, head_dim, factor, kLo, kHi, kOldCtx);
  for (size_t j = 0; j < want.size(); ++j)
    if (!(std::abs(double(stored[j]) - want[j]) <= 1e-5 * want[j]))
      fail(where, ": RoPE frequency factor ", j, " is ", stored[j],
           "; only Llama 3 scaling (low_freq_factor 1, ",
           "high_freq_factor 4, original context 8192) is supported, which gives ", want[j]);
  return json{{"rope_type", "llama3"},
              {"factor", short_decimal(factor)},
              {"low_freq_factor", kLo},
              {"high_freq_factor", kHi},
              {"original_max_position_embeddings", int64_t(kOldCtx)}};
}

}  // namespace

json gguf_config_json(const GgufFile& f) {
  const std::string file = f.path().string();
  const std::string arch = f.get_string("general.architecture");
  if (arch != "llama" && arch != "qwen2" && arch != "qwen3")
    fail(file, ": general.architecture \"", arch, "\" is not supported (supported: llama, qwen2, qwen3)");
  const std::string p = arch + ".";
  auto opt_int = [&](const std::string& key) -> std::optional<int64_t> {
    if (!f.find(key)) return std::nullopt;
    return f.get_int(key);
  };

  json c;
  c["architectures"] = json::array({arch == "qwen2"   ? "Qwen2ForCausalLM"
                                    : arch == "qwen3" ? "Qwen3ForCausalLM"
                                                      : "LlamaForCausalLM"});
  c["model_type"] = arch;
  c["hidden_size"] = f.get_int(p + "embedding_length");
  c["intermediate_size"] = f.get_int(p + "feed_forward_length");
  c["num_hidden_layers"] = f.get_int(p + "block_count");
  const int64_t heads = f.get_int(p + "attention.head_count");
  c["num_attention_heads"] = heads;
  c["num_key_value_heads"] = opt_int(p + "attention.head_count_kv").value_or(heads);
  if (heads <= 0) fail(file, ": key ", p, "attention.head_count must be positive, got ", heads);
  int64_t head_dim = c["hidden_size"].get<int64_t>() / heads;
  if (auto k = opt_int(p + "attention.key_length")) {
    head_dim = *k;
    c["head_dim"] = *k;
  }
  if (auto r = opt_int(p + "rope.dimension_count"); r && *r != head_dim)
    fail(file, ": key ", p, "rope.dimension_count is ", *r, " but the head size is ", head_dim,
         "; partial rotary embeddings are not supported");
  if (auto ctx = opt_int(p + "context_length")) c["max_position_embeddings"] = *ctx;
  c["rms_norm_eps"] = short_decimal(f.get_float(p + "attention.layer_norm_rms_epsilon"));
  const double theta =
      f.find(p + "rope.freq_base") ? short_decimal(f.get_float(p + "rope.freq_base")) : 10000.0;
  c["rope_theta"] = theta;

  // RoPE scaling: metadata (linear), or Llama 3's factor tensor.
  c["rope_scaling"] = nullptr;
  std::string scaling = f.find(p + "rope.scaling.type") ? f.get_string(p + "rope.scaling.type") : "none";
  if (scaling == "none" && f.find(p + "rope.scale_linear")) scaling = "linear";  // older files
  if (scaling == "linear") {
    const std::string key =
        f.find(p + "rope.scaling.factor") ? p + "rope.scaling.factor" : p + "rope.scale_linear";
    c["rope_scaling"] = json{{"rope_type", "linear"}, {"factor", short_decimal(f.get_float(key))}};
  } else if (scaling != "none") {
    fail(file, ": key ", p, "rope.scaling.type \"", scaling, "\" is not supported (supported: none, linear)");
  }
  if (const GgufTensorInfo* t = f.find_tensor("rope_freqs.weight")) {
    if (!c["rope_scaling"].is_null())
      fail(file, ": both ", p, "rope.scaling.type and tensor rope_freqs.weight are present");
    c["rope_scaling"] = llama3_scaling_from_rope_freqs(f, *t, theta, head_dim);
  }

  // Shapes the metadata may omit come from the tensors themselves.
  const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
  if (!embd) fail(file, ": no tensor token_embd.weight (the token embeddings)");
  if (embd->ne.size() != 2)
    fail(file, ": tensor token_embd.weight must have 2 dimensions, got ", embd->ne.size());
  c["vocab_size"] = embd->ne[1];
  c["tie_word_embeddings"] = f.find_tensor("output.weight") == nullptr;
  if (arch == "llama") {
    c["attention_bias"] = f.find_tensor("blk.0.attn_q.bias") != nullptr;
    c["mlp_bias"] = f.find_tensor("blk.0.ffn_gate.bias") != nullptr;
  }
  if (arch == "qwen2" || arch == "qwen3") c["use_sliding_window"] = false;
  if (arch == "qwen3") c["attention_bias"] = f.find_tensor("blk.0.attn_q.bias") != nullptr;

  c["bos_token_id"] = nullptr;
  c["eos_token_id"] = nullptr;
  if (auto b = opt_int("tokenizer.ggml.bos_token_id")) c["bos_token_id"] = *b;
  // End of sequence, and of a turn (Llama 3's <|eot_id|>, <|eom_id|>): as
  // generation_config.json lists them, every one ends a reply.
  json eos = json::array();
  for (const char* key :
       {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"})
    if (auto e = opt_int(key); e && std::find(eos.begin(), eos.end(), json(*e)) == eos.end())
      eos.push_back(*e);
  if (eos.size() == 1) c["eos_token_id"] = eos[0];
  if (eos.size() > 1) c["eos_token_id"] = eos;
  c["torch_dtype"] = "bfloat16";
  return c;
}

ModelConfig gguf_model_config(const GgufFile& f) {
  ModelConfig cfg = parse_model_config(gguf_config_json(f), f.path().string());
  return cfg;
}

}  // namespace qlora
