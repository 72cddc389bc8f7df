#include "model/builtin.h"

#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/dtype.h"
#include "core/error.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/tensor_table.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

// splitmix64 + Box-Muller: the same weights on every platform and standard
// library (std::normal_distribution is implementation-defined).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return (double(next() >> 11) + 0.5) * 0x1.0p-53; }  // (0, 1)
  double normal() {
    const double u = uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }

 private:
  uint64_t s_;
};

nlohmann::ordered_json tiny_config() {
  return {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"vocab_size", 512},
      {"hidden_size", 128},
      {"intermediate_size", 352},
      {"num_hidden_layers", 4},
      {"num_attention_heads", 4},
      {"num_key_value_heads", 2},
      {"head_dim", 32},
      {"max_position_embeddings", 512},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0},
      {"rope_scaling", nullptr},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"tie_word_embeddings", false},
      {"bos_token_id", 1},
      {"eos_token_id", 2},
      {"initializer_range", 0.02},
      {"torch_dtype", "bfloat16"},
  };
}

}  // namespace

bool is_builtin_model(std::string_view spec) { return spec.rfind("builtin:", 0) == 0; }

std::vector<std::string> builtin_model_names() { return {"tiny"}; }

void write_builtin_model(std::string_view name, const fs::path& dest) {
  if (name != "tiny") fail("unknown built-in model \"builtin:", name, "\" (available: builtin:tiny)");
  const nlohmann::ordered_json cj = tiny_config();
  const ModelConfig cfg = parse_model_config(nlohmann::json::parse(cj.dump()), "builtin:tiny");

  AtomicDir dir(dest, /*replace=*/true);
  write_file_atomic(dir.path() / "config.json", cj.dump(2) + "\n");
  write_file_atomic(dir.path() / "generation_config.json",
                    "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n");

  // Linear weights ~ N(0, 0.02) (the HF initializer), norms 1, embeddings N(0, 1) * 0.02.
  Rng rng(20261126);
  std::vector<OwnedTensor> tensors;
  for (const TensorSlot& slot : expected_tensors(cfg)) {
    const auto n = size_t(shape_numel(slot.shape));
    const bool is_norm = slot.kind == TensorKind::AttnNorm || slot.kind == TensorKind::MlpNorm ||
                         slot.kind == TensorKind::FinalNorm;
    std::vector<float> v(n);
    for (auto& x : v) x = is_norm ? 1.0f : float(0.02 * rng.normal());
    OwnedTensor t{slot.name, DType::BF16, slot.shape, std::vector<uint8_t>(n * 2)};
    convert_from_f32(v.data(), n, DType::BF16, t.bytes.data());
    tensors.push_back(std::move(t));
  }
  save_safetensors(dir.path() / "model.safetensors", tensors, {{"format", "pt"}});
  dir.commit();
}

fs::path resolve_model_path(const std::string& spec) {
  if (!is_builtin_model(spec)) return spec;
  const std::string name = spec.substr(8);
  fs::path cache;
  if (const char* c = std::getenv("QLORA_CACHE"); c && *c) cache = c;
  else if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) cache = fs::path(x) / "qlora";
  else if (const char* h = std::getenv("HOME"); h && *h) cache = fs::path(h) / ".cache" / "qlora";
  else cache = fs::temp_directory_path() / "qlora-cache";
  // Versioned, so a changed demo model never meets a stale cached copy.
  const fs::path dir = cache / "builtin" / (name + "-v1");
  if (!fs::exists(dir / "model.safetensors")) {
    std::error_code ec;
    fs::create_directories(dir.parent_path(), ec);
    if (ec) fail(dir.parent_path().string(), ": cannot create the cache folder: ", ec.message());
    write_builtin_model(name, dir);
  }
  return dir;
}

}  // namespace qlora
