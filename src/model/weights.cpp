#include "model/weights.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/gguf_weights.h"
#include "model/tensor_table.h"
#include "model/weights_layout.h"
#include "quant/bnb_layout.h"
#include "quant/dynamic_map.h"

namespace qlora {

namespace weights_detail {

bool keeps_4bit(const TensorSlot& s, const WeightLoadOptions& opt) {
  return s.is_block_linear && opt.quantize;
}

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

void check_nested_scales(int64_t nblocks, const NestedAbsmax& nq, const std::string& name) {
  if (int64_t(nq.codes.size()) != nblocks || nq.nested_block != kNestedBlock ||
      int64_t(nq.nested_absmax.size()) != quant4_num_blocks(nblocks, kNestedBlock) ||
      !(nq.code8.empty() || nq.code8.size() == 256))
    fail("internal: double-quantized scales of ", name, " do not fit the layout (", nq.codes.size(),
         " codes, ", nq.nested_absmax.size(), " nested scales of block ", nq.nested_block, ", ", nblocks,
         " blocks)");
}

void store_nested_scales(PlacedTensor& p, int64_t nblocks, const NestedAbsmax& nq, const std::string& name) {
  if (!p.absmax8) fail("internal: ", name, " has no room for double-quantized scales");
  check_nested_scales(nblocks, nq, name);
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
  StreamedTensor t;
  t.slot = &s;
  t.numel = shape_numel(s.shape);
  t.dense = p.dense;
  t.codes = p.codes;
  t.scales = p.scales;
  t.absmax8 = p.absmax8;
  t.nested_absmax = p.nested_absmax;
  t.code8 = p.code8;
  t.offset = p.offset;
  return linear_view(t, opt);
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
      case TensorKind::Embed:
        w.embed = p.dense;
        break;
      case TensorKind::LmHead:
        w.lm_head = p.dense;
        break;
      case TensorKind::FinalNorm:
        w.final_norm = p.dense;
        break;
      case TensorKind::AttnNorm:
        L->attn_norm = p.dense;
        break;
      case TensorKind::MlpNorm:
        L->mlp_norm = p.dense;
        break;
      case TensorKind::QNorm:
        L->q_norm = p.dense;
        break;
      case TensorKind::KNorm:
        L->k_norm = p.dense;
        break;
      case TensorKind::Q:
        L->q = linear(s, p, opt);
        break;
      case TensorKind::K:
        L->k = linear(s, p, opt);
        break;
      case TensorKind::V:
        L->v = linear(s, p, opt);
        break;
      case TensorKind::O:
        L->o = linear(s, p, opt);
        break;
      case TensorKind::Gate:
        L->gate = linear(s, p, opt);
        break;
      case TensorKind::Up:
        L->up = linear(s, p, opt);
        break;
      case TensorKind::Down:
        L->down = linear(s, p, opt);
        break;
      case TensorKind::QBias:
        L->q_bias = p.dense;
        break;
      case TensorKind::KBias:
        L->k_bias = p.dense;
        break;
      case TensorKind::VBias:
        L->v_bias = p.dense;
        break;
      case TensorKind::OBias:
        L->o_bias = p.dense;
        break;
      case TensorKind::GateBias:
        L->gate_bias = p.dense;
        break;
      case TensorKind::UpBias:
        L->up_bias = p.dense;
        break;
      case TensorKind::DownBias:
        L->down_bias = p.dense;
        break;
    }
  }
  if (w.cfg.tie_word_embeddings) w.lm_head = w.embed;
  w.quantized = opt.quantize;
}

}  // namespace weights_detail

ops::LinearWeight linear_view(const StreamedTensor& t, const WeightLoadOptions& opt) {
  ops::LinearWeight w;
  w.out = t.slot->shape[0];
  w.in = t.slot->shape[1];
  w.dense = t.dense;
  w.codes = t.codes;
  w.absmax = t.scales;
  w.block = opt.block;
  w.type = opt.type;
  if (t.absmax8) {
    w.absmax8 = t.absmax8;
    w.nested_absmax = t.nested_absmax;
    w.code8 = t.code8;
    w.offset = t.offset;
    w.nested_block = kNestedBlock;
  }
  return w;
}

namespace {

using weights_detail::PlacedTensor;

void check_finite(const float* x, int64_t n, const std::string& name, const std::string& source) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i]))
      fail("tensor ", name, " in ", source, " holds a non-finite value (", x[i], ") at flat index ", i);
}

// A plain (not 4-bit) tensor as fp32.
std::vector<float> read_f32(const SafetensorsModel& m, const std::string& name) {
  const auto& e = m.at(name);
  if (!dtype_is_float(e.info->dtype))
    fail("tensor ", name, " in ", e.file->path().string(), " has dtype ", dtype_name(e.info->dtype),
         "; expected F32, BF16 or F16");
  std::vector<float> v(size_t(e.info->numel()));
  convert_to_f32(m.data(name).data(), e.info->dtype, v.size(), v.data());
  check_finite(v.data(), int64_t(v.size()), name, m.source().string());
  return v;
}

}  // namespace

size_t base_weight_arena_bytes(const ModelConfig& cfg, const WeightLoadOptions& opt) {
  Arena measure;
  weights_detail::layout_weights(measure, expected_tensors(cfg), opt);
  return measure.used();
}

namespace {

// The folder after every check: what stream_llama_weights needs to read it.
struct CheckedFolder {
  ModelConfig cfg;
  WeightLoadOptions opt;          // in effect (a bitsandbytes checkpoint fixes the quantization)
  std::vector<TensorSlot> slots;  // expected_tensors(cfg)
  std::vector<std::string> bnb;   // the checkpoint's 4-bit tensors, sorted
};

CheckedFolder check_folder(const std::filesystem::path& dir, const SafetensorsModel& m,
                           const ModelConfig& cfg, const WeightLoadOptions& opt_in) {
  CheckedFolder f;
  f.cfg = cfg;
  f.slots = expected_tensors(cfg);
  // A bitsandbytes checkpoint fixes the quantization; its state is read per tensor.
  f.bnb = bnb_quantized_weights(m);
  const std::vector<std::string>& bnb = f.bnb;
  WeightLoadOptions& opt = f.opt;
  opt = opt_in;
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
  const TensorCheck check = check_tensors(f.slots, present);
  if (!check.ok())
    fail(m.source().string(), " does not match ", dir.string(), "/config.json:\n", check.report());
  if (opt.quantize && !valid_block4(opt.block)) fail("invalid 4-bit block size ", opt.block);
  return f;
}

ModelConfig load_checked_config(const std::filesystem::path& dir) {
  ModelConfig cfg = load_model_config(dir);
  if (cfg.head_dim % 2 != 0)
    fail(dir.string(), "/config.json: head_dim ", cfg.head_dim, " must be even for RoPE");
  return cfg;
}

// Copies each streamed tensor into its place in the arena.
class ArenaSink final : public WeightSink {
 public:
  explicit ArenaSink(LlamaWeights& w) : w_(w) {}
  void begin(const ModelConfig& cfg, const WeightLoadOptions& opt,
             const std::vector<TensorSlot>& slots) override {
    w_.cfg = cfg;
    opt_ = opt;
    slots_ = slots;
    w_.arena = Arena(base_weight_arena_bytes(cfg, opt), "base weights");
    placed_ = weights_detail::layout_weights(w_.arena, slots, opt);
  }
  void put(const StreamedTensor& t) override {
    PlacedTensor& p = placed_.at(t.index);
    const std::string& name = t.slot->name;
    if (p.dense) {
      if (!t.dense) fail("internal: ", name, " arrived 4-bit for a dense slot");
      std::copy(t.dense, t.dense + t.numel, p.dense);
      return;
    }
    if (!t.codes || !t.scales || bool(p.absmax8) != bool(t.absmax8))
      fail("internal: ", name, " arrived in another form than its slot");
    const int64_t blocks = quant4_num_blocks(t.numel, opt_.block);
    std::copy(t.codes, t.codes + quant4_code_bytes(t.numel), p.codes);
    std::copy(t.scales, t.scales + blocks, p.scales);
    if (p.absmax8) {
      std::copy(t.absmax8, t.absmax8 + blocks, p.absmax8);
      std::copy(t.nested_absmax, t.nested_absmax + quant4_num_blocks(blocks, kNestedBlock), p.nested_absmax);
      std::copy(t.code8, t.code8 + 256, p.code8);
      p.offset = t.offset;
    }
  }
  void finish() { weights_detail::bind_weights(w_, slots_, placed_, opt_); }

 private:
  LlamaWeights& w_;
  WeightLoadOptions opt_;
  std::vector<TensorSlot> slots_;
  std::vector<PlacedTensor> placed_;
};

}  // namespace

ModelConfig check_llama_weights(const std::filesystem::path& dir, const WeightLoadOptions& opt) {
  if (is_gguf_file(dir)) return GgufModel(dir).config();
  const ModelConfig cfg = load_checked_config(dir);
  const SafetensorsModel m(dir);
  return check_folder(dir, m, cfg, opt).cfg;
}

namespace {

// Hands slot i to the sink in its final form. The values arrive either as
// fp32 (`dense`: an HF or GGUF tensor; quantized here when the slot keeps
// 4 bits) or as a bitsandbytes checkpoint's 4-bit form (`q`, when `dense` is
// empty). `source` names the file for errors.
void deliver(size_t i, const TensorSlot& s, std::vector<float> dense, Quant4Tensor q,
             const WeightLoadOptions& opt, const std::string& source, WeightSink& sink) {
  const int64_t n = shape_numel(s.shape);
  const bool keep4 = weights_detail::keeps_4bit(s, opt);
  StreamedTensor t;
  t.index = i;
  t.slot = &s;
  t.numel = n;
  std::vector<float> scales;
  if (dense.empty()) {  // a checkpoint's 4-bit weight
    if (!keep4) {
      dense.resize(size_t(n));
      dequantize_tensor(q, dense.data());
      check_finite(dense.data(), n, s.name, source);
    }
  } else if (keep4) {
    q = quantize_tensor(dense.data(), s.shape, opt.type, opt.block, opt.double_quant);
    dense = std::vector<float>();  // the 4-bit form replaces it
  }
  if (keep4) {
    // The block scales: the kept double-quantized form and its decode, or
    // plain fp32 scales (decoded here if the file nests them).
    const int64_t nblocks = quant4_num_blocks(n, q.block);
    t.codes = q.codes.data();
    if (opt.double_quant) {
      if (!q.nested) fail("internal: ", s.name, " has no double-quantized scales to keep");
      const NestedAbsmax& nq = *q.nested;
      weights_detail::check_nested_scales(nblocks, nq, s.name);
      scales.resize(size_t(nblocks));
      // The reference decode itself, so the fp32 scales equal the kept form's by construction.
      double_dequantize(nq, scales.data());
      t.absmax8 = nq.codes.data();
      t.nested_absmax = nq.nested_absmax.data();
      t.code8 = nq.code8.empty() ? dynamic_map_signed().data() : nq.code8.data();
      t.offset = nq.offset;
    } else if (q.nested) {
      scales = q.block_scales();
    } else {
      scales = std::move(q.absmax);
    }
    check_finite(scales.data(), nblocks, s.name + " (absmax)", source);
    t.scales = scales.data();
  } else {
    t.dense = dense.data();
  }
  sink.put(t);
}

// A GGUF model: every tensor dequantized to fp32, then as an HF tensor.
void stream_gguf_weights(const std::filesystem::path& file, const WeightLoadOptions& opt, WeightSink& sink) {
  const GgufModel m(file);
  if (opt.quantize && !valid_block4(opt.block)) fail("invalid 4-bit block size ", opt.block);
  sink.begin(m.config(), opt, m.slots());
  for (size_t i = 0; i < m.slots().size(); ++i)
    deliver(i, m.slots()[i], m.read(i), Quant4Tensor{}, opt, m.file().path().string(), sink);
}

}  // namespace

void stream_llama_weights(const std::filesystem::path& dir, const WeightLoadOptions& opt_in,
                          WeightSink& sink) {
  if (is_gguf_file(dir)) return stream_gguf_weights(dir, opt_in, sink);
  const ModelConfig cfg = load_checked_config(dir);
  const SafetensorsModel m(dir);
  const CheckedFolder f = check_folder(dir, m, cfg, opt_in);
  const std::vector<std::string>& bnb = f.bnb;
  sink.begin(f.cfg, f.opt, f.slots);
  for (size_t i = 0; i < f.slots.size(); ++i) {
    const TensorSlot& s = f.slots[i];
    // Each holds this tensor only, freed when the iteration ends.
    if (std::binary_search(bnb.begin(), bnb.end(), s.name))
      deliver(i, s, {}, load_bnb_weight(m, s.name), f.opt, m.source().string(), sink);
    else
      deliver(i, s, read_f32(m, s.name), Quant4Tensor{}, f.opt, m.source().string(), sink);
  }
}

LlamaWeights load_llama_weights(const std::filesystem::path& dir, const WeightLoadOptions& opt) {
  LlamaWeights w;
  ArenaSink sink(w);
  stream_llama_weights(dir, opt, sink);
  sink.finish();
  return w;
}

}  // namespace qlora
