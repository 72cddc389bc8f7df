#include "model/weights.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/tensor_table.h"
#include "quant/bnb_layout.h"

namespace qlora {

namespace {

// Where one expected tensor lives in the arena.
struct Placed {
  float* dense = nullptr;    // dense fp32 values, or
  uint8_t* codes = nullptr;  // 4-bit codes + fp32 block scales
  float* scales = nullptr;
};

bool keep_4bit(const TensorSlot& s, bool quantize) { return s.is_block_linear && quantize; }

// The same layout code sizes the arena (measuring) and then places views in it.
std::vector<Placed> layout(Arena& a, const std::vector<TensorSlot>& slots, const WeightLoadOptions& opt) {
  std::vector<Placed> out(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t n = shape_numel(slots[i].shape);
    if (keep_4bit(slots[i], opt.quantize)) {
      out[i].codes = a.take<uint8_t>(size_t(quant4_code_bytes(n)), slots[i].name);
      out[i].scales = a.take<float>(size_t(quant4_num_blocks(n, opt.block)), slots[i].name);
    } else {
      out[i].dense = a.take<float>(size_t(n), slots[i].name);
    }
  }
  return out;
}

void check_finite(const float* x, int64_t n, const std::string& name, const SafetensorsModel& m) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i]))
      fail("tensor ", name, " in ", m.source().string(), " holds a non-finite value (", x[i], ") at flat index ", i);
}

// A plain (not 4-bit) tensor as fp32.
std::vector<float> read_f32(const SafetensorsModel& m, const std::string& name) {
  const auto& e = m.at(name);
  if (!dtype_is_float(e.info->dtype))
    fail("tensor ", name, " in ", e.file->path().string(), " has dtype ", dtype_name(e.info->dtype),
         "; expected F32, BF16 or F16");
  std::vector<float> v(size_t(e.info->numel()));
  convert_to_f32(m.data(name).data(), e.info->dtype, v.size(), v.data());
  check_finite(v.data(), int64_t(v.size()), name, m);
  return v;
}

ops::LinearWeight linear(const TensorSlot& s, const Placed& p, const WeightLoadOptions& opt) {
  ops::LinearWeight w;
  w.out = s.shape[0];
  w.in = s.shape[1];
  w.dense = p.dense;
  w.codes = p.codes;
  w.absmax = p.scales;
  w.block = opt.block;
  w.type = opt.type;
  return w;
}

}  // namespace

size_t base_weight_arena_bytes(const ModelConfig& cfg, const WeightLoadOptions& opt) {
  Arena measure;
  layout(measure, expected_tensors(cfg), opt);
  return measure.used();
}

LlamaWeights load_llama_weights(const std::filesystem::path& dir, const WeightLoadOptions& opt_in) {
  LlamaWeights w;
  w.cfg = load_model_config(dir);
  const ModelConfig& cfg = w.cfg;
  if (cfg.head_dim % 2 != 0) fail(dir.string(), "/config.json: head_dim ", cfg.head_dim, " must be even for RoPE");
  const SafetensorsModel m(dir);
  const std::vector<TensorSlot> slots = expected_tensors(cfg);

  // A bitsandbytes checkpoint fixes the quantization; its state is read per tensor.
  const std::vector<std::string> bnb = bnb_quantized_weights(m);
  WeightLoadOptions opt = opt_in;
  std::vector<PresentTensor> present;
  for (const auto& name : m.names()) {
    if (is_bnb_companion(name) || is_ignorable_tensor(name)) continue;
    Shape shape = m.at(name).info->shape;
    if (std::binary_search(bnb.begin(), bnb.end(), name)) {
      const Quant4Tensor q = load_bnb_weight(m, name);
      shape = q.shape;
      // One block size and type for the whole model (what bitsandbytes writes).
      if (name != bnb.front() && (q.type != opt.type || q.block != opt.block))
        fail("tensor ", name, " in ", m.source().string(), " uses ", quant4_name(q.type), " block ", q.block,
             " but ", bnb.front(), " uses ", quant4_name(opt.type), " block ", opt.block);
      opt.type = q.type;
      opt.block = q.block;
    }
    present.push_back({name, shape});
  }
  const TensorCheck check = check_tensors(slots, present);
  if (!check.ok()) fail(m.source().string(), " does not match ", dir.string(), "/config.json:\n", check.report());
  if (opt.quantize && !valid_block4(opt.block)) fail("invalid 4-bit block size ", opt.block);

  w.arena = Arena(base_weight_arena_bytes(cfg, opt), "base weights");
  const std::vector<Placed> placed = layout(w.arena, slots, opt);
  w.quantized = opt.quantize;

  w.layers.resize(size_t(cfg.num_hidden_layers));
  for (size_t i = 0; i < slots.size(); ++i) {
    const TensorSlot& s = slots[i];
    const Placed& p = placed[i];
    const int64_t n = shape_numel(s.shape);
    const bool is_bnb = std::binary_search(bnb.begin(), bnb.end(), s.name);
    if (is_bnb) {
      const Quant4Tensor q = load_bnb_weight(m, s.name);
      if (p.codes) {
        std::copy(q.codes.begin(), q.codes.end(), p.codes);
        const std::vector<float> scales = q.block_scales();
        check_finite(scales.data(), int64_t(scales.size()), s.name + " (absmax)", m);
        std::copy(scales.begin(), scales.end(), p.scales);
      } else {
        dequantize_tensor(q, p.dense);
        check_finite(p.dense, n, s.name, m);
      }
    } else {
      const std::vector<float> v = read_f32(m, s.name);
      if (p.codes) {
        const Quant4Tensor q = quantize_tensor(v.data(), s.shape, opt.type, opt.block, opt.double_quant);
        std::copy(q.codes.begin(), q.codes.end(), p.codes);
        const std::vector<float> scales = q.block_scales();
        std::copy(scales.begin(), scales.end(), p.scales);
      } else {
        std::copy(v.begin(), v.end(), p.dense);
      }
    }
    LlamaLayerWeights* L = s.layer >= 0 ? &w.layers[size_t(s.layer)] : nullptr;
    switch (s.kind) {
      case TensorKind::Embed: w.embed = p.dense; break;
      case TensorKind::LmHead: w.lm_head = p.dense; break;
      case TensorKind::FinalNorm: w.final_norm = p.dense; break;
      case TensorKind::AttnNorm: L->attn_norm = p.dense; break;
      case TensorKind::MlpNorm: L->mlp_norm = p.dense; break;
      case TensorKind::Q: L->q = linear(s, p, opt); break;
      case TensorKind::K: L->k = linear(s, p, opt); break;
      case TensorKind::V: L->v = linear(s, p, opt); break;
      case TensorKind::O: L->o = linear(s, p, opt); break;
      case TensorKind::Gate: L->gate = linear(s, p, opt); break;
      case TensorKind::Up: L->up = linear(s, p, opt); break;
      case TensorKind::Down: L->down = linear(s, p, opt); break;
      case TensorKind::QBias: L->q_bias = p.dense; break;
      case TensorKind::KBias: L->k_bias = p.dense; break;
      case TensorKind::VBias: L->v_bias = p.dense; break;
      case TensorKind::OBias: L->o_bias = p.dense; break;
      case TensorKind::GateBias: L->gate_bias = p.dense; break;
      case TensorKind::UpBias: L->up_bias = p.dense; break;
      case TensorKind::DownBias: L->down_bias = p.dense; break;
    }
  }
  if (cfg.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

}  // namespace qlora
