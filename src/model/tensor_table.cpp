// The tensor table of the Llama family as data. Each row says which tensor
// kind it is, its Hugging Face name ("{i}" = layer index), its shape in terms
// of the config's sizes, and when it exists. Adding an architecture variant
// means adding rows or conditions, not another branch of code.
#include "model/tensor_table.h"

#include <map>
#include <set>

#include "core/error.h"

namespace qlora {

namespace {

// Symbolic sizes: V vocab, C hidden, I intermediate, QD = H*D (all query
// heads), KVD = KV*D (all key/value heads), D = one head. None ends a 1-D shape.
enum class Dim { None, V, C, I, QD, KVD, D };
enum class Part { Head, Layer, Tail };  // before the blocks, per block, after
enum class When { Always, AttnBias, OBias, QkNorm, MlpBias, Untied };

struct Row {
  TensorKind kind;
  Part part;
  const char* name;
  Dim d0, d1;
  When when;
  bool block_linear;
};

// clang-format off
constexpr Row kTable[] = {
  {TensorKind::Embed,     Part::Head,  "model.embed_tokens.weight",                      Dim::V,   Dim::C,    When::Always,        false},

  {TensorKind::AttnNorm,  Part::Layer, "model.layers.{i}.input_layernorm.weight",        Dim::C,   Dim::None, When::Always,        false},
  {TensorKind::Q,         Part::Layer, "model.layers.{i}.self_attn.q_proj.weight",       Dim::QD,  Dim::C,    When::Always,        true},
  {TensorKind::K,         Part::Layer, "model.layers.{i}.self_attn.k_proj.weight",       Dim::KVD, Dim::C,    When::Always,        true},
  {TensorKind::V,         Part::Layer, "model.layers.{i}.self_attn.v_proj.weight",       Dim::KVD, Dim::C,    When::Always,        true},
  {TensorKind::QBias,     Part::Layer, "model.layers.{i}.self_attn.q_proj.bias",         Dim::QD,  Dim::None, When::AttnBias,      false},
  {TensorKind::KBias,     Part::Layer, "model.layers.{i}.self_attn.k_proj.bias",         Dim::KVD, Dim::None, When::AttnBias,      false},
  {TensorKind::VBias,     Part::Layer, "model.layers.{i}.self_attn.v_proj.bias",         Dim::KVD, Dim::None, When::AttnBias,      false},
  {TensorKind::O,         Part::Layer, "model.layers.{i}.self_attn.o_proj.weight",       Dim::C,   Dim::QD,   When::Always,        true},
  {TensorKind::OBias,     Part::Layer, "model.layers.{i}.self_attn.o_proj.bias",         Dim::C,   Dim::None, When::OBias,         false},
  {TensorKind::QNorm,     Part::Layer, "model.layers.{i}.self_attn.q_norm.weight",       Dim::D,   Dim::None, When::QkNorm,        false},
  {TensorKind::KNorm,     Part::Layer, "model.layers.{i}.self_attn.k_norm.weight",       Dim::D,   Dim::None, When::QkNorm,        false},
  {TensorKind::MlpNorm,   Part::Layer, "model.layers.{i}.post_attention_layernorm.weight", Dim::C, Dim::None, When::Always,        false},
  {TensorKind::Gate,      Part::Layer, "model.layers.{i}.mlp.gate_proj.weight",          Dim::I,   Dim::C,    When::Always,        true},
  {TensorKind::Up,        Part::Layer, "model.layers.{i}.mlp.up_proj.weight",            Dim::I,   Dim::C,    When::Always,        true},
  {TensorKind::Down,      Part::Layer, "model.layers.{i}.mlp.down_proj.weight",          Dim::C,   Dim::I,    When::Always,        true},
  {TensorKind::GateBias,  Part::Layer, "model.layers.{i}.mlp.gate_proj.bias",            Dim::I,   Dim::None, When::MlpBias,       false},
  {TensorKind::UpBias,    Part::Layer, "model.layers.{i}.mlp.up_proj.bias",              Dim::I,   Dim::None, When::MlpBias,       false},
  {TensorKind::DownBias,  Part::Layer, "model.layers.{i}.mlp.down_proj.bias",            Dim::C,   Dim::None, When::MlpBias,       false},

  {TensorKind::FinalNorm, Part::Tail,  "model.norm.weight",                              Dim::C,   Dim::None, When::Always,        false},
  {TensorKind::LmHead,    Part::Tail,  "lm_head.weight",                                 Dim::V,   Dim::C,    When::Untied,        false},
};
// clang-format on

const Row* row_of(TensorKind k) {
  for (const Row& r : kTable)
    if (r.kind == k) return &r;
  return nullptr;
}

bool applies(When w, const ModelConfig& cfg) {
  switch (w) {
    case When::Always: return true;
    case When::AttnBias: return cfg.attention_bias;
    // Qwen2 has q/k/v biases but no o_proj bias; Llama's (and Qwen3's)
    // attention_bias puts a bias on all four projections.
    case When::OBias: return cfg.attention_bias && cfg.arch != Arch::Qwen2;
    case When::QkNorm: return cfg.qk_norm;
    case When::MlpBias: return cfg.mlp_bias;
    case When::Untied: return !cfg.tie_word_embeddings;
  }
  return false;
}

int64_t size_of(Dim d, const ModelConfig& cfg) {
  switch (d) {
    case Dim::V: return cfg.vocab_size;
    case Dim::C: return cfg.hidden_size;
    case Dim::I: return cfg.intermediate_size;
    case Dim::QD: return cfg.q_dim();
    case Dim::KVD: return cfg.kv_dim();
    case Dim::D: return cfg.head_dim;
    case Dim::None: break;
  }
  return 0;
}

const char* dim_name(Dim d) {
  switch (d) {
    case Dim::V: return "V";
    case Dim::C: return "C";
    case Dim::I: return "I";
    case Dim::QD: return "H*D";
    case Dim::KVD: return "KV*D";
    case Dim::D: return "D";
    case Dim::None: break;
  }
  return "?";
}

std::string symbolic_shape(const Row& r) {
  if (r.d1 == Dim::None) return str("[", dim_name(r.d0), "]");
  return str("[", dim_name(r.d0), ", ", dim_name(r.d1), "]");
}

std::string layer_name(const char* pattern, int64_t layer) {
  std::string s = pattern;
  const size_t at = s.find("{i}");
  if (at != std::string::npos) s.replace(at, 3, std::to_string(layer));
  return s;
}

void add_rows(std::vector<TensorSlot>& out, const ModelConfig& cfg, Part part, int64_t layer) {
  for (const Row& r : kTable) {
    if (r.part != part || !applies(r.when, cfg)) continue;
    Shape shape{size_of(r.d0, cfg)};
    if (r.d1 != Dim::None) shape.push_back(size_of(r.d1, cfg));
    out.push_back(TensorSlot{layer_name(r.name, layer), r.kind, layer, std::move(shape), r.block_linear});
  }
}

}  // namespace

std::string_view tensor_kind_name(TensorKind k) {
  switch (k) {
    case TensorKind::Embed: return "embed";
    case TensorKind::AttnNorm: return "attn_norm";
    case TensorKind::Q: return "q";
    case TensorKind::K: return "k";
    case TensorKind::V: return "v";
    case TensorKind::O: return "o";
    case TensorKind::QBias: return "q_bias";
    case TensorKind::KBias: return "k_bias";
    case TensorKind::VBias: return "v_bias";
    case TensorKind::OBias: return "o_bias";
    case TensorKind::QNorm: return "q_norm";
    case TensorKind::KNorm: return "k_norm";
    case TensorKind::MlpNorm: return "mlp_norm";
    case TensorKind::Gate: return "gate";
    case TensorKind::Up: return "up";
    case TensorKind::Down: return "down";
    case TensorKind::GateBias: return "gate_bias";
    case TensorKind::UpBias: return "up_bias";
    case TensorKind::DownBias: return "down_bias";
    case TensorKind::FinalNorm: return "final_norm";
    case TensorKind::LmHead: return "lm_head";
  }
  return "?";
}

std::vector<TensorSlot> expected_tensors(const ModelConfig& cfg) {
  std::vector<TensorSlot> out;
  add_rows(out, cfg, Part::Head, -1);
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) add_rows(out, cfg, Part::Layer, i);
  add_rows(out, cfg, Part::Tail, -1);
  return out;
}

bool is_ignorable_tensor(std::string_view name) {
  constexpr std::string_view kInvFreq = ".rotary_emb.inv_freq";
  return name.size() >= kInvFreq.size() && name.substr(name.size() - kInvFreq.size()) == kInvFreq;
}

TensorCheck check_tensors(const std::vector<TensorSlot>& expected, const std::vector<PresentTensor>& present) {
  std::map<std::string_view, const Shape*> found;  // first occurrence wins
  for (const PresentTensor& p : present) found.emplace(p.name, &p.shape);

  TensorCheck out;
  std::set<std::string_view> wanted;
  const Shape* embed_shape = nullptr;
  bool has_lm_head = false;
  for (const TensorSlot& s : expected) {
    wanted.insert(s.name);
    if (s.kind == TensorKind::Embed) embed_shape = &s.shape;
    if (s.kind == TensorKind::LmHead) has_lm_head = true;
    auto it = found.find(s.name);
    if (it == found.end()) {
      out.missing.push_back(s.name);
      const Row* r = row_of(s.kind);
      out.missing_expected.push_back(r ? str(symbolic_shape(*r), " = ", shape_str(s.shape)) : shape_str(s.shape));
    } else if (*it->second != s.shape) {
      out.wrong_shape.push_back({s.name, s.shape, *it->second});
    }
  }

  // A tied model has no lm_head.weight of its own, yet some exports write a
  // copy of the embedding under that name anyway. The copy is harmless (the
  // loader ties to embed_tokens and ignores it), so it is accepted when its
  // shape matches the embedding; with another shape the file is inconsistent.
  const bool tied = embed_shape != nullptr && !has_lm_head;
  const std::string_view lm_head = row_of(TensorKind::LmHead)->name;

  std::set<std::string_view> seen;
  for (const PresentTensor& p : present) {
    if (wanted.count(p.name) || is_ignorable_tensor(p.name) || !seen.insert(p.name).second) continue;
    if (tied && p.name == lm_head) {
      if (p.shape != *embed_shape) out.wrong_shape.push_back({p.name, *embed_shape, p.shape});
      continue;
    }
    out.unexpected.push_back(p.name);
  }
  return out;
}

std::string TensorCheck::report(size_t limit) const {
  std::string out;
  auto more = [&](size_t total, const char* what) {
    if (total > limit) out += str("... and ", total - limit, " more ", what, "\n");
  };
  for (size_t i = 0; i < missing.size() && i < limit; ++i) {
    out += str("missing tensor ", missing[i]);
    if (i < missing_expected.size() && !missing_expected[i].empty()) out += str(" (expected ", missing_expected[i], ")");
    out += "\n";
  }
  more(missing.size(), "missing tensors");
  for (size_t i = 0; i < unexpected.size() && i < limit; ++i) out += str("unexpected tensor ", unexpected[i], "\n");
  more(unexpected.size(), "unexpected tensors");
  for (size_t i = 0; i < wrong_shape.size() && i < limit; ++i) {
    const WrongShape& w = wrong_shape[i];
    out += str("wrong shape for ", w.name, ": expected ", shape_str(w.expected), ", found ", shape_str(w.actual), "\n");
  }
  more(wrong_shape.size(), "tensors with wrong shapes");
  return out;
}

}  // namespace qlora
