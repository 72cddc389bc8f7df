#include "model/weights.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/tensor_table.h"
#include "model/weights_layout.h"
#include "quant/bnb_layout.h"
#include "quant/dynamic_map.h"

namespace qlora {

namespace weights_detail {

bool keeps_4bit(const TensorSlot& s, const WeightLoadOptions& opt) { return s.is_block_linear && opt.quantize; }

// The same code sizes the arena (measuring) and then places views in it.
std::vector<PlacedTensor> layout_weights(Arena& a, const std::vector<TensorSlot>& slots,
                                         const WeightLoadOptions& opt) {
  std::vector<PlacedTensor> out(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) {
    const int64_t n = shape_numel(slots[i].shape);
    const std::string& name = slots[i].name;
    if (keeps_4bit(slots[i], opt)) {
      const int64_t blocks = quant4_num_blocks(n, opt.block);
      out[i].codes = a.take<uint8_t>(size_t(quant4_code_bytes(n)), name);
      out[i].scales = a.take<float>(size_t(blocks), name);
      if (opt.double_quant) {
        out[i].absmax8 = a.take<uint8_t>(size_t(blocks), name);
        out[i].nested_absmax = a.take<float>(size_t(quant4_num_blocks(blocks, kNestedBlock)), name);
        out[i].code8 = a.take<float>(256, name);
      }
    } else {
      out[i].dense = a.take<float>(size_t(n), name);
    }
  }
  return out;
}

void store_nested_scales(PlacedTensor& p, int64_t nblocks, const NestedAbsmax& nq, const std::string& name) {
  if (!p.absmax8) fail("internal: ", name, " has no room for double-quantized scales");
  if (int64_t(nq.codes.size()) != nblocks || nq.nested_block != kNestedBlock ||
      int64_t(nq.nested_absmax.size()) != quant4_num_blocks(nblocks, kNestedBlock) ||
      !(nq.code8.empty() || nq.code8.size() == 256))
    fail("internal: double-quantized scales of ", name, " do not fit the layout (", nq.codes.size(),
         " codes, ", nq.nested_absmax.size(), " nested scales of block ", nq.nested_block, ", ", nblocks,
         " blocks)");
  std::copy(nq.codes.begin(), nq.codes.end(), p.absmax8);
  std::copy(nq.nested_absmax.begin(), nq.nested_absmax.end(), p.nested_absmax);
  const float* code8 = nq.code8.empty() ? dynamic_map_signed().data() : nq.code8.data();
  std::copy(code8, code8 + 256, p.code8);
  p.offset = nq.offset;
  // The reference decode itself, so the CPU scales equal the kept form's by construction.
  double_dequantize(nq, p.scales);
}

namespace {

ops::LinearWeight linear(const TensorSlot& s, const PlacedTensor& p, const WeightLoadOptions& opt) {
  ops::LinearWeight w;
  w.out = s.shape[0];
  w.in = s.shape[1];
  w.dense = p.dense;
  w.codes = p.codes;
  w.absmax = p.scales;
  w.block = opt.block;
  w.type = opt.type;
  if (p.absmax8) {
    w.absmax8 = p.absmax8;
    w.nested_absmax = p.nested_absmax;
    w.code8 = p.code8;
    w.offset = p.offset;
    w.nested_block = kNestedBlock;
  }
  return w;
}

}  // namespace

void bind_weights(LlamaWeights& w, const std::vector<TensorSlot>& slots,
                  const std::vector<PlacedTensor>& placed, const WeightLoadOptions& opt) {
  w.layers.assign(size_t(w.cfg.num_hidden_layers), LlamaLayerWeights{});
  for (size_t i = 0; i < slots.size(); ++i) {
    const TensorSlot& s = slots[i];
    const PlacedTensor& p = placed[i];
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
  if (w.cfg.tie_word_embeddings) w.lm_head = w.embed;
  w.quantized = opt.quantize;
}

}  // namespace weights_detail

namespace {

using weights_detail::PlacedTensor;

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

}  // namespace

void release_tensors(LlamaWeights& w) {
  w.arena = Arena();
  w.embed = w.lm_head = w.final_norm = nullptr;
  w.layers.clear();
  w.layers.shrink_to_fit();
}

size_t base_weight_arena_bytes(const ModelConfig& cfg, const WeightLoadOptions& opt) {
  Arena measure;
  weights_detail::layout_weights(measure, expected_tensors(cfg), opt);
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
  // Its double-quantized scales are kept as they are when every 4-bit tensor
  // has them in bitsandbytes' form (nested block 256, which is all it writes);
  // any other checkpoint keeps plain fp32 scales only.
  bool all_nested = !bnb.empty();
  std::vector<PresentTensor> present;
  for (const auto& name : m.names()) {
    if (is_bnb_companion(name) || is_ignorable_tensor(name)) continue;
    Shape shape = m.at(name).info->shape;
    if (std::binary_search(bnb.begin(), bnb.end(), name)) {
      const BnbQuantState q = check_bnb_weight(m, name);
      shape = q.shape;
      // One block size and type for the whole model (what bitsandbytes writes).
      if (name != bnb.front() && (q.type != opt.type || q.block != opt.block))
        fail("tensor ", name, " in ", m.source().string(), " uses ", quant4_name(q.type), " block ", q.block,
             " but ", bnb.front(), " uses ", quant4_name(opt.type), " block ", opt.block);
      opt.type = q.type;
      opt.block = q.block;
      all_nested = all_nested && q.nested && q.nested_block == kNestedBlock;
    }
    present.push_back({name, shape});
  }
  if (!bnb.empty()) opt.double_quant = all_nested;
  const TensorCheck check = check_tensors(slots, present);
  if (!check.ok()) fail(m.source().string(), " does not match ", dir.string(), "/config.json:\n", check.report());
  if (opt.quantize && !valid_block4(opt.block)) fail("invalid 4-bit block size ", opt.block);

  w.arena = Arena(base_weight_arena_bytes(cfg, opt), "base weights");
  std::vector<PlacedTensor> placed = weights_detail::layout_weights(w.arena, slots, opt);

  // The block scales of one 4-bit tensor: the kept double-quantized form and
  // its decode, or plain fp32 scales (decoded here if the file nests them).
  auto store_scales = [&](PlacedTensor& p, const Quant4Tensor& q, const std::string& name) {
    const int64_t nblocks = quant4_num_blocks(q.numel(), q.block);
    if (p.absmax8) {
      if (!q.nested) fail("internal: ", name, " has no double-quantized scales to keep");
      weights_detail::store_nested_scales(p, nblocks, *q.nested, name);
    } else {
      const std::vector<float> scales = q.block_scales();
      std::copy(scales.begin(), scales.end(), p.scales);
    }
    check_finite(p.scales, nblocks, name + " (absmax)", m);
  };

  for (size_t i = 0; i < slots.size(); ++i) {
    const TensorSlot& s = slots[i];
    PlacedTensor& p = placed[i];
    const int64_t n = shape_numel(s.shape);
    const bool is_bnb = std::binary_search(bnb.begin(), bnb.end(), s.name);
    if (is_bnb) {
      const Quant4Tensor q = load_bnb_weight(m, s.name);
      if (p.codes) {
        std::copy(q.codes.begin(), q.codes.end(), p.codes);
        store_scales(p, q, s.name);
      } else {
        dequantize_tensor(q, p.dense);
        check_finite(p.dense, n, s.name, m);
      }
    } else {
      const std::vector<float> v = read_f32(m, s.name);
      if (p.codes) {
        const Quant4Tensor q = quantize_tensor(v.data(), s.shape, opt.type, opt.block, opt.double_quant);
        std::copy(q.codes.begin(), q.codes.end(), p.codes);
        store_scales(p, q, s.name);
      } else {
        std::copy(v.begin(), v.end(), p.dense);
      }
    }
  }
  weights_detail::bind_weights(w, slots, placed, opt);
  return w;
}

}  // namespace qlora
