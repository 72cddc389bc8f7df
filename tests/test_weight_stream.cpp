// stream_llama_weights against load_llama_weights: tensor by tensor, in
// expected_tensors order, the streamed bytes are the arena's (dense fp32, or
// 4-bit codes + fp32 scales + the kept double-quantized form), for
// quantize-on-load NF4 with and without double quantization, FP4, dense, and
// bitsandbytes checkpoints (nested, plain, dequantized); a bad folder fails
// with the loader's error before the sink sees anything (WeightStream*).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/builtin.h"
#include "model/tensor_table.h"
#include "model/weights.h"
#include "quant/blockwise.h"
#include "testing.h"
#include "tools/quantize_model.h"

namespace qlora {
namespace {

// One streamed tensor, copied out of the call.
struct Recorded {
  size_t index = 0;
  std::string name;
  std::vector<uint8_t> dense, codes, scales, absmax8, nested_absmax, code8;
  bool double_quant = false;
  float offset = 0.0f;
};

template <typename T>
std::vector<uint8_t> bytes(const T* p, int64_t n) {
  if (p == nullptr) return {};
  const auto* b = reinterpret_cast<const uint8_t*>(p);
  return std::vector<uint8_t>(b, b + size_t(n) * sizeof(T));
}

class RecordingSink final : public WeightSink {
 public:
  void begin(const ModelConfig& c, const WeightLoadOptions& o, const std::vector<TensorSlot>& s) override {
    ++begins;
    cfg = c;
    opt = o;
    slots = s;
  }
  void put(const StreamedTensor& t) override {
    Recorded r;
    r.index = t.index;
    r.name = t.slot->name;
    EXPECT_EQ(t.numel, shape_numel(t.slot->shape)) << r.name;
    r.dense = bytes(t.dense, t.numel);
    r.codes = bytes(t.codes, quant4_code_bytes(t.numel));
    const int64_t blocks = quant4_num_blocks(t.numel, opt.block);
    r.scales = bytes(t.scales, blocks);
    r.double_quant = t.absmax8 != nullptr;
    if (r.double_quant) {
      r.absmax8 = bytes(t.absmax8, blocks);
      r.nested_absmax = bytes(t.nested_absmax, quant4_num_blocks(blocks, kNestedBlock));
      r.code8 = bytes(t.code8, 256);
      r.offset = t.offset;
    }
    got.push_back(std::move(r));
  }
  int begins = 0;
  ModelConfig cfg;
  WeightLoadOptions opt;
  std::vector<TensorSlot> slots;
  std::vector<Recorded> got;
};

// The arena's view of one expected tensor, as load_llama_weights binds it.
Recorded arena_view(const LlamaWeights& w, const TensorSlot& s) {
  Recorded r;
  r.name = s.name;
  const int64_t n = shape_numel(s.shape);
  const LlamaLayerWeights* L = s.layer >= 0 ? &w.layers.at(size_t(s.layer)) : nullptr;
  const float* dense = nullptr;
  const ops::LinearWeight* lw = nullptr;
  switch (s.kind) {
    case TensorKind::Embed:
      dense = w.embed;
      break;
    case TensorKind::LmHead:
      dense = w.lm_head;
      break;
    case TensorKind::FinalNorm:
      dense = w.final_norm;
      break;
    case TensorKind::AttnNorm:
      dense = L->attn_norm;
      break;
    case TensorKind::MlpNorm:
      dense = L->mlp_norm;
      break;
    case TensorKind::QNorm:
      dense = L->q_norm;
      break;
    case TensorKind::KNorm:
      dense = L->k_norm;
      break;
    case TensorKind::Q:
      lw = &L->q;
      break;
    case TensorKind::K:
      lw = &L->k;
      break;
    case TensorKind::V:
      lw = &L->v;
      break;
    case TensorKind::O:
      lw = &L->o;
      break;
    case TensorKind::Gate:
      lw = &L->gate;
      break;
    case TensorKind::Up:
      lw = &L->up;
      break;
    case TensorKind::Down:
      lw = &L->down;
      break;
    case TensorKind::QBias:
      dense = L->q_bias;
      break;
    case TensorKind::KBias:
      dense = L->k_bias;
      break;
    case TensorKind::VBias:
      dense = L->v_bias;
      break;
    case TensorKind::OBias:
      dense = L->o_bias;
      break;
    case TensorKind::GateBias:
      dense = L->gate_bias;
      break;
    case TensorKind::UpBias:
      dense = L->up_bias;
      break;
    case TensorKind::DownBias:
      dense = L->down_bias;
      break;
  }
  if (lw != nullptr) dense = lw->dense;
  r.dense = bytes(dense, n);
  if (lw != nullptr && lw->quantized()) {
    const int64_t blocks = quant4_num_blocks(n, lw->block);
    r.codes = bytes(lw->codes, quant4_code_bytes(n));
    r.scales = bytes(lw->absmax, blocks);
    r.double_quant = lw->double_quant();
    if (r.double_quant) {
      r.absmax8 = bytes(lw->absmax8, blocks);
      r.nested_absmax = bytes(lw->nested_absmax, quant4_num_blocks(blocks, lw->nested_block));
      r.code8 = bytes(lw->code8, 256);
      r.offset = lw->offset;
    }
  }
  return r;
}

// Streams dir and loads it; every tensor's bytes must agree. Returns the
// sink for further checks.
RecordingSink expect_stream_matches_load(const std::filesystem::path& dir, const WeightLoadOptions& opt) {
  RecordingSink sink;
  stream_llama_weights(dir, opt, sink);
  const LlamaWeights w = load_llama_weights(dir, opt);
  const std::vector<TensorSlot> slots = expected_tensors(w.cfg);
  EXPECT_EQ(sink.begins, 1);
  EXPECT_EQ(sink.slots.size(), slots.size());
  EXPECT_EQ(sink.opt.quantize, w.quantized);
  EXPECT_EQ(base_weight_arena_bytes(sink.cfg, sink.opt), w.arena.used());
  EXPECT_EQ(check_llama_weights(dir, opt).num_hidden_layers, w.cfg.num_hidden_layers);
  EXPECT_EQ(sink.got.size(), slots.size());
  for (size_t i = 0; i < std::min(sink.got.size(), slots.size()); ++i) {
    const Recorded& got = sink.got[i];
    const Recorded want = arena_view(w, slots[i]);
    SCOPED_TRACE(slots[i].name);
    EXPECT_EQ(got.index, i);
    EXPECT_EQ(got.name, slots[i].name);
    EXPECT_EQ(got.dense, want.dense);
    EXPECT_EQ(got.codes, want.codes);
    EXPECT_EQ(got.scales, want.scales);
    EXPECT_EQ(got.double_quant, want.double_quant);
    EXPECT_EQ(got.absmax8, want.absmax8);
    EXPECT_EQ(got.nested_absmax, want.nested_absmax);
    EXPECT_EQ(got.code8, want.code8);
    EXPECT_EQ(std::memcmp(&got.offset, &want.offset, sizeof(float)), 0);
    // Exactly one form per tensor.
    EXPECT_NE(got.dense.empty(), got.codes.empty());
  }
  return sink;
}

size_t count_4bit(const RecordingSink& s, bool double_quant) {
  size_t n = 0;
  for (const Recorded& r : s.got) n += !r.codes.empty() && r.double_quant == double_quant ? 1 : 0;
  return n;
}

TEST(WeightStream, QuantizeOnLoadAndDenseGiveTheArenaBytes) {
  testing::ScratchDir d;
  write_builtin_model("tiny", d / "tiny");
  WeightLoadOptions nf4_dq, nf4, fp4, dense;
  nf4.double_quant = false;
  fp4.type = Quant4Type::FP4;
  fp4.block = 128;
  dense.quantize = false;
  const RecordingSink a = expect_stream_matches_load(d / "tiny", nf4_dq);
  const size_t linears = size_t(7 * a.cfg.num_hidden_layers);
  EXPECT_EQ(count_4bit(a, true), linears);
  const RecordingSink b = expect_stream_matches_load(d / "tiny", nf4);
  EXPECT_EQ(count_4bit(b, false), linears);
  const RecordingSink c = expect_stream_matches_load(d / "tiny", fp4);
  EXPECT_EQ(count_4bit(c, true), linears);
  EXPECT_EQ(c.opt.block, 128);
  const RecordingSink e = expect_stream_matches_load(d / "tiny", dense);
  EXPECT_EQ(count_4bit(e, true) + count_4bit(e, false), 0u);
}

TEST(WeightStream, BitsandbytesCheckpointsGiveTheArenaBytes) {
  testing::ScratchDir d;
  write_builtin_model("tiny", d / "tiny");
  quantize_model(d / "tiny", d / "q", {});
  QuantizeOptions plain;
  plain.double_quant = false;
  quantize_model(d / "tiny", d / "p", plain);
  // The checkpoint decides: its nested form is kept even when the options
  // ask for none, and plain scales stay plain when they ask for it.
  WeightLoadOptions no_dq, dense;
  no_dq.double_quant = false;
  dense.quantize = false;
  const RecordingSink q = expect_stream_matches_load(d / "q", no_dq);
  const size_t linears = size_t(7 * q.cfg.num_hidden_layers);
  EXPECT_TRUE(q.opt.double_quant);
  EXPECT_EQ(count_4bit(q, true), linears);
  const RecordingSink p = expect_stream_matches_load(d / "p", {});
  EXPECT_FALSE(p.opt.double_quant);
  EXPECT_EQ(count_4bit(p, false), linears);
  // Dequantized to fp32 when the options ask for a dense model.
  const RecordingSink qd = expect_stream_matches_load(d / "q", dense);
  EXPECT_EQ(count_4bit(qd, true) + count_4bit(qd, false), 0u);
}

// A folder that does not match its config fails as load_llama_weights does,
// before begin: nothing is allocated on the sink's side.
TEST(WeightStream, BadFolderFailsBeforeTheSinkSeesAnything) {
  testing::ScratchDir d;
  write_builtin_model("tiny", d / "tiny");
  std::string config = testing::read_bytes(d / "tiny" / "config.json");
  const std::string key = "\"num_hidden_layers\": ";
  const size_t at = config.find(key);
  ASSERT_NE(at, std::string::npos) << config;
  config.insert(at + key.size(), "1");  // 4 -> 14 layers: tensors missing
  testing::write_bytes(d / "tiny" / "config.json", config);
  const std::string want = testing::error_of([&] { (void)load_llama_weights(d / "tiny"); });
  EXPECT_NE(want.find("does not match"), std::string::npos) << want;
  RecordingSink sink;
  EXPECT_EQ(testing::error_of([&] { stream_llama_weights(d / "tiny", {}, sink); }), want);
  EXPECT_EQ(testing::error_of([&] { (void)check_llama_weights(d / "tiny"); }), want);
  EXPECT_EQ(sink.begins, 0);
  EXPECT_TRUE(sink.got.empty());
}

}  // namespace
}  // namespace qlora
