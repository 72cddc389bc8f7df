// Whole-model LoRA gradients against finite differences (tiny random model
// with GQA, llama3 rope scaling, two packed documents per row, NF4 base), bad
// input: files disagreeing with config.json, NaN weights, bad positions,
// adapters for another model; and the double-quantized scales the loader
// keeps beside the fp32 ones (Weights* suites).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/builtin.h"
#include "model/llama.h"
#include "model/tensor_table.h"
#include "quant/blockwise.h"
#include "quant/bnb_layout.h"
#include "testing.h"
#include "tools/quantize_model.h"

namespace qlora {
namespace {

const SafetensorsFile& golden_file(const char* name) {
  static std::map<std::string, SafetensorsFile> files;
  auto it = files.find(name);
  if (it == files.end())
    it = files.emplace(name, SafetensorsFile(std::string(QLORA_SOURCE_DIR) + "/tests/reference/" + name)).first;
  return it->second;
}
const SafetensorsFile& golden() { return golden_file("model_golden.safetensors"); }

// The golden script's tiny model as an HF folder; `edit` may alter a tensor.
void write_model(const std::filesystem::path& dir, const std::string& config,
                 void (*edit)(OwnedTensor&) = nullptr, const SafetensorsFile& g = golden()) {
  std::vector<OwnedTensor> ts;
  for (const TensorInfo& t : g.tensors()) {
    if (t.name.rfind("model.", 0) != 0 && t.name != "lm_head.weight") continue;
    const auto bytes = g.data(t);
    ts.push_back({t.name, t.dtype, t.shape, std::vector<uint8_t>(bytes.begin(), bytes.end())});
    if (edit) edit(ts.back());
  }
  save_safetensors(dir / "model.safetensors", ts);
  testing::write_bytes(dir / "config.json", config);
}

std::vector<int32_t> ints(const std::string& name, const SafetensorsFile& g = golden()) {
  const auto b = g.data(*g.find(name));
  std::vector<int32_t> v(b.size() / 4);
  std::memcpy(v.data(), b.data(), b.size());
  return v;
}

// Finite differences of the fp32 loss L (~5) with step h = 1e-2 on LoRA
// entries of size ~0.2. Rounding: L carries a relative error of at most about
// k u with k ~ 64 accumulation steps along its longest chain, so the central
// difference has an absolute error up to k u |L| / h ~ 2e-3 (u = 2^-24).
// Truncation: h^2/6 |L'''| ~ 2e-5 |L'''|; allowed as 2e-2 relative.
// The entries with the largest gradients are checked, so the signal is far
// above that floor. Three models: llama (GQA, llama3 rope scaling), qwen3 with
// one full and one sliding-window layer (per-head q/k norms, head_dim !=
// hidden/heads), mistral with a window on every layer (tests/reference/
// make_model_golden*.py).
class ModelGrad : public ::testing::TestWithParam<const char*> {};

TEST_P(ModelGrad, LoraGradientsMatchFiniteDifferences) {
  const SafetensorsFile& gf = golden_file(GetParam());
  testing::ScratchDir dir;
  write_model(dir.path(), gf.metadata().at("config"), nullptr, gf);
  const LlamaWeights w = load_llama_weights(dir.path());  // NF4 + double quant
  LoraConfig lc;
  lc.rank = 4;
  lc.alpha = 8;
  LoraWeights lora(w.cfg, lc);
  for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      for (bool a : {true, false}) {
        const auto b = gf.data(*gf.find(lora.peft_name(l, LoraTarget(t), a)));
        std::memcpy(a ? lora.A(l, LoraTarget(t)) : lora.B(l, LoraTarget(t)), b.data(), b.size());
      }
  const auto tokens = ints("input.tokens", gf), targets = ints("input.targets", gf),
             positions = ints("input.positions", gf);
  const LlamaBatch batch{tokens.data(), targets.data(), positions.data(), 2, int64_t(tokens.size()) / 2};
  LlamaModel model(w, &lora, batch.B, batch.T);
  const double L0 = model.forward(batch);
  model.backward();
  constexpr float h = 1e-2f;
  const double floor = 64 * 5.96e-8 * std::abs(L0) / h;
  int checked = 0;
  for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t)
      for (bool is_a : {true, false}) {
        const auto [in, out] = lora_target_dims(w.cfg, LoraTarget(t));
        const int64_t n = is_a ? 4 * in : out * 4;
        float* p = is_a ? lora.A(l, LoraTarget(t)) : lora.B(l, LoraTarget(t));
        const float* g = is_a ? lora.dA(l, LoraTarget(t)) : lora.dB(l, LoraTarget(t));
        const int64_t j = std::max_element(g, g + n, [](float x, float y) { return std::abs(x) < std::abs(y); }) - g;
        const float gj = g[j], orig = p[j];
        p[j] = orig + h;
        const double Lp = model.forward(batch);
        p[j] = orig - h;
        const double Lm = model.forward(batch);
        p[j] = orig;
        const double fd = (Lp - Lm) / (2.0 * h);
        EXPECT_NEAR(gj, fd, floor + 2e-2 * std::abs(fd)) << lora.peft_name(l, LoraTarget(t), is_a) << "[" << j << "]";
        ++checked;
      }
  EXPECT_EQ(checked, 28);
}
INSTANTIATE_TEST_SUITE_P(Golden, ModelGrad,
                         ::testing::Values("model_golden.safetensors", "model_golden_qwen3_window.safetensors",
                                           "model_golden_mistral_window.safetensors"),
                         [](const ::testing::TestParamInfo<const char*>& i) {
                           std::string n = i.param;
                           n = n.substr(0, n.find('.'));
                           return n;
                         });

// DoRA through the whole model, with per-module ranks and LoRA dropout (its
// masks fixed by resetting the forward count before each forward), against
// finite differences of A, B and the magnitudes. The norm ||W + s B A|| is
// detached, as PEFT detaches it: the loss the gradients belong to holds it
// constant, so the finite differences do too (the model is asked for the
// loss with the norms of the unperturbed adapter: perturbing one entry of B
// or A moves the norm, which these gradients deliberately ignore). So the
// check perturbs the magnitudes, which the norm does not depend on, against
// the full loss, and A and B against the loss with frozen norms, computed
// here as L(m * n_frozen / n(A, B)) = the loss with magnitudes rescaled.
// Tolerance as in LoraGradientsMatchFiniteDifferences.
TEST(ModelGrad, DoraGradientsMatchFiniteDifferences) {
  testing::ScratchDir dir;
  write_model(dir.path(), golden().metadata().at("config"));
  const LlamaWeights w = load_llama_weights(dir.path());  // NF4 + double quant
  for (double dropout : {0.0, 0.2}) {
    LoraConfig lc;
    lc.rank = 4;
    lc.alpha = 8;
    lc.dora = true;
    lc.dropout = dropout;
    lc.seed = 5;
    lc.rank_pattern = {{"down_proj", 2}};
    LoraWeights lora(w.cfg, lc);
    unsigned seed = 40;
    for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
      for (int t = 0; t < kNumLoraTargets; ++t) {
        const auto [in, out] = lora_target_dims(w.cfg, LoraTarget(t));
        const int64_t R = lora.rank(l, LoraTarget(t));
        const auto a = testing::randn(R * in, seed++, 0.2f), b = testing::randn(out * R, seed++, 0.2f);
        std::copy(a.begin(), a.end(), lora.A(l, LoraTarget(t)));
        std::copy(b.begin(), b.end(), lora.B(l, LoraTarget(t)));
      }
    init_dora_magnitudes(lora, w);  // m = ||W + s B A||: g = 1 at first
    for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
      for (int t = 0; t < kNumLoraTargets; ++t) {
        const int64_t out = lora_target_dims(w.cfg, LoraTarget(t)).second;
        const auto r = testing::randn(out, seed++, 0.2f);
        for (int64_t i = 0; i < out; ++i) lora.M(l, LoraTarget(t))[i] *= 1.0f + r[size_t(i)];
      }
    const auto tokens = ints("input.tokens"), targets = ints("input.targets"), positions = ints("input.positions");
    const LlamaBatch batch{tokens.data(), targets.data(), positions.data(), 2, int64_t(tokens.size()) / 2};
    LlamaModel model(w, &lora, batch.B, batch.T);
    auto loss = [&] {
      model.set_forward_count(0);  // the same dropout masks every time
      return model.forward(batch);
    };
    const double L0 = loss();
    model.backward();
    // The norms of the unperturbed adapter, for the frozen-norm loss.
    LoraWeights norms(w.cfg, lc);
    std::memcpy(norms.flat_params(), lora.flat_params(), lora.flat_size() * sizeof(float));
    init_dora_magnitudes(norms, w);
    LoraWeights probe(w.cfg, lc);
    // L with A and B as in `lora` but every norm held at `norms`: the model
    // divides by n(A, B), so give it m * n(A, B) / n_frozen.
    auto frozen_loss = [&] {
      std::memcpy(probe.flat_params(), lora.flat_params(), lora.flat_size() * sizeof(float));
      init_dora_magnitudes(probe, w);  // probe.M = n(A, B)
      std::vector<float> saved(lora.flat_size());
      std::memcpy(saved.data(), lora.flat_params(), saved.size() * sizeof(float));
      for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
        for (int t = 0; t < kNumLoraTargets; ++t) {
          const int64_t out = lora_target_dims(w.cfg, LoraTarget(t)).second;
          for (int64_t i = 0; i < out; ++i)
            lora.M(l, LoraTarget(t))[i] *= probe.M(l, LoraTarget(t))[i] / norms.M(l, LoraTarget(t))[i];
        }
      const double L = loss();
      std::memcpy(lora.flat_params(), saved.data(), saved.size() * sizeof(float));
      return L;
    };
    constexpr float h = 1e-2f;
    const double floor = 64 * 5.96e-8 * std::abs(L0) / h;
    int checked = 0;
    for (int64_t l = 0; l < w.cfg.num_hidden_layers; ++l)
      for (int t = 0; t < kNumLoraTargets; ++t)
        for (int part = 0; part < 3; ++part) {
          const LoraTarget tg = LoraTarget(t);
          const auto [in, out] = lora_target_dims(w.cfg, tg);
          const int64_t R = lora.rank(l, tg);
          const int64_t n = part == 0 ? R * in : part == 1 ? out * R : out;
          float* p = part == 0 ? lora.A(l, tg) : part == 1 ? lora.B(l, tg) : lora.M(l, tg);
          const float* gr = part == 0 ? lora.dA(l, tg) : part == 1 ? lora.dB(l, tg) : lora.dM(l, tg);
          const int64_t j = std::max_element(gr, gr + n, [](float x, float y) { return std::abs(x) < std::abs(y); }) - gr;
          const float gj = gr[j], orig = p[j];
          p[j] = orig + h;
          const double Lp = part == 2 ? loss() : frozen_loss();
          p[j] = orig - h;
          const double Lm = part == 2 ? loss() : frozen_loss();
          p[j] = orig;
          const double fd = (Lp - Lm) / (2.0 * h);
          EXPECT_NEAR(gj, fd, floor + 2e-2 * std::abs(fd))
              << "dropout " << dropout << " " << lora_module_name(l, tg) << " part " << part << "[" << j << "]";
          ++checked;
        }
    EXPECT_EQ(checked, 42);
  }
}

TEST(ModelBadInput, ShapesDisagreeingWithConfigNameTheTensor) {
  testing::ScratchDir dir;
  std::string cfg = golden().metadata().at("config");
  const auto at = cfg.find("\"intermediate_size\": 48");
  ASSERT_NE(at, std::string::npos);
  cfg.replace(at, 23, "\"intermediate_size\": 40");
  write_model(dir.path(), cfg);
  try {
    load_llama_weights(dir.path());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mlp.gate_proj.weight"), std::string::npos) << e.what();
  }
}

TEST(ModelBadInput, NanWeightIsRefusedByName) {
  testing::ScratchDir dir;
  write_model(dir.path(), golden().metadata().at("config"), [](OwnedTensor& t) {
    if (t.name != "model.layers.1.mlp.up_proj.weight") return;
    const float nan = std::nanf("");
    std::memcpy(t.bytes.data() + 40, &nan, 4);
  });
  try {
    load_llama_weights(dir.path());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.up_proj.weight"), std::string::npos) << e.what();
  }
}

TEST(ModelBadInput, BadPositionsAndOversizedBatchesAreRefused) {
  testing::ScratchDir dir;
  write_model(dir.path(), golden().metadata().at("config"));
  const LlamaWeights w = load_llama_weights(dir.path());
  LlamaModel model(w, nullptr, 1, 4);
  const std::vector<int32_t> tokens = {1, 2, 3, 4}, targets = {2, 3, 4, -100};
  const std::vector<int32_t> bad_pos = {0, 1, 3, 4};
  EXPECT_THROW(model.forward({tokens.data(), targets.data(), bad_pos.data(), 1, 4}), Error);
  EXPECT_THROW(model.forward({tokens.data(), targets.data(), nullptr, 2, 2}), Error);
  const std::vector<int32_t> bad_tok = {1, 2, 96, 4};
  EXPECT_THROW(model.forward({bad_tok.data(), targets.data(), nullptr, 1, 4}), Error);
  EXPECT_THROW(LlamaModel(w, nullptr, 1, w.cfg.max_position_embeddings + 1), Error);
  EXPECT_NO_THROW(model.forward({tokens.data(), targets.data(), nullptr, 1, 4}));
}

TEST(ModelBadInput, AdapterForAnotherShapeIsRefusedByName) {
  testing::ScratchDir dir;
  write_model(dir.path(), golden().metadata().at("config"));
  const ModelConfig cfg = load_model_config(dir.path());
  const auto ad = dir / "adapter";
  std::filesystem::create_directories(ad);
  testing::write_bytes(ad / "adapter_config.json", R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})");
  std::vector<OwnedTensor> ts;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string p = "base_model.model.model.layers." + std::to_string(l) + ".self_attn.q_proj.";
    const int64_t in = l == 1 ? 16 : cfg.hidden_size;  // layer 1 from a narrower model
    ts.push_back({p + "lora_A.weight", DType::F32, {4, in}, std::vector<uint8_t>(size_t(16 * in))});
    ts.push_back({p + "lora_B.weight", DType::F32, {cfg.q_dim(), 4}, std::vector<uint8_t>(size_t(16 * cfg.q_dim()))});
  }
  save_safetensors(ad / "adapter_model.safetensors", ts);
  try {
    LoraWeights::load_peft(ad, cfg);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.1.self_attn.q_proj.lora_A"), std::string::npos) << e.what();
  }
}


// ---- the double-quantized form kept beside the fp32 scales

std::vector<const ops::LinearWeight*> linears(const LlamaWeights& w) {
  std::vector<const ops::LinearWeight*> out;
  for (const LlamaLayerWeights& L : w.layers)
    for (const ops::LinearWeight* lw : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) out.push_back(lw);
  return out;
}

// The linear a block-linear slot was loaded into.
const ops::LinearWeight& linear_of(const LlamaWeights& w, const TensorSlot& s) {
  const LlamaLayerWeights& L = w.layers[size_t(s.layer)];
  switch (s.kind) {
    case TensorKind::Q: return L.q;
    case TensorKind::K: return L.k;
    case TensorKind::V: return L.v;
    case TensorKind::O: return L.o;
    case TensorKind::Gate: return L.gate;
    case TensorKind::Up: return L.up;
    default: return L.down;
  }
}

int64_t blocks_of(const ops::LinearWeight& lw) { return quant4_num_blocks(lw.out * lw.in, lw.block); }

// The kept form of one linear as the NestedAbsmax it came from.
NestedAbsmax kept_form(const ops::LinearWeight& lw) {
  const int64_t nb = blocks_of(lw);
  NestedAbsmax nq;
  nq.codes.assign(lw.absmax8, lw.absmax8 + nb);
  nq.nested_absmax.assign(lw.nested_absmax, lw.nested_absmax + quant4_num_blocks(nb, lw.nested_block));
  nq.code8.assign(lw.code8, lw.code8 + 256);
  nq.offset = lw.offset;
  nq.nested_block = lw.nested_block;
  return nq;
}

// Every block's fp32 scale is bit for bit double_dequantize of the kept form
// (memcmp: -0 vs +0 or a NaN payload would show).
void expect_scales_decode_kept_form(const LlamaWeights& w) {
  for (const ops::LinearWeight* lw : linears(w)) {
    ASSERT_TRUE(lw->quantized());
    ASSERT_TRUE(lw->double_quant());
    EXPECT_EQ(lw->nested_block, kNestedBlock);
    const int64_t nb = blocks_of(*lw);
    std::vector<float> want(static_cast<size_t>(nb));
    double_dequantize(kept_form(*lw), want.data());
    EXPECT_EQ(std::memcmp(want.data(), lw->absmax, size_t(nb) * sizeof(float)), 0);
  }
}

TEST(WeightsNested, QuantizeOnLoadKeepsTheDoubleQuantizedForm) {
  testing::ScratchDir d;
  write_builtin_model("tiny", d / "tiny");
  const LlamaWeights w = load_llama_weights(d / "tiny");  // NF4 + double quant
  expect_scales_decode_kept_form(w);
  WeightLoadOptions dq;
  EXPECT_EQ(w.arena.used(), base_weight_arena_bytes(w.cfg, dq));
  // The kept form is the double quantization of the file's values, not just
  // something that decodes consistently.
  const SafetensorsModel m(d / "tiny");
  for (const TensorSlot& s : expected_tensors(w.cfg)) {
    if (!s.is_block_linear) continue;
    const auto& e = m.at(s.name);
    std::vector<float> v(size_t(e.info->numel()));
    convert_to_f32(m.data(s.name).data(), e.info->dtype, v.size(), v.data());
    const Quant4Tensor q = quantize_tensor(v.data(), s.shape, Quant4Type::NF4, 64, true);
    const NestedAbsmax kept = kept_form(linear_of(w, s));
    EXPECT_EQ(kept.codes, q.nested->codes) << s.name;
    EXPECT_EQ(kept.nested_absmax, q.nested->nested_absmax) << s.name;
    EXPECT_EQ(std::memcmp(&kept.offset, &q.nested->offset, sizeof(float)), 0) << s.name;
  }

  // Without double quantization, and dense: no kept form, and the arena says so.
  for (const bool quantize : {true, false}) {
    WeightLoadOptions opt;
    opt.quantize = quantize;
    opt.double_quant = false;
    const LlamaWeights p = load_llama_weights(d / "tiny", opt);
    for (const ops::LinearWeight* lw : linears(p)) {
      EXPECT_EQ(lw->quantized(), quantize);
      EXPECT_FALSE(lw->double_quant());
      EXPECT_EQ(lw->nested_absmax, nullptr);
      EXPECT_EQ(lw->code8, nullptr);
    }
    EXPECT_EQ(p.arena.used(), base_weight_arena_bytes(p.cfg, opt));
    if (quantize) {
      EXPECT_LT(p.arena.used(), w.arena.used());
    }
  }
}

// Rewrites a checkpoint folder's model.safetensors through `edit`.
void rewrite_model(const std::filesystem::path& dir,
                   const std::function<void(std::vector<OwnedTensor>&)>& edit) {
  std::vector<OwnedTensor> ts;
  {
    const SafetensorsModel m(dir);
    for (const std::string& n : m.names()) {
      const auto& e = m.at(n);
      const auto b = m.data(n);
      ts.push_back({n, e.info->dtype, e.info->shape, std::vector<uint8_t>(b.begin(), b.end())});
    }
  }
  edit(ts);
  save_safetensors(dir / "model.safetensors", ts);
}

OwnedTensor* find_tensor(std::vector<OwnedTensor>& ts, const std::string& name) {
  for (OwnedTensor& t : ts)
    if (t.name == name) return &t;
  return nullptr;
}

// A bitsandbytes checkpoint's nested state is kept as the files hold it, per
// tensor (its own offset, its own code book), and decodes to the fp32 scales.
TEST(WeightsNested, BitsandbytesCheckpointKeepsItsOwnNestedState) {
  testing::ScratchDir d;
  write_builtin_model("tiny", d / "tiny");
  quantize_model(d / "tiny", d / "q", {});
  // One tensor's code book differs from ours in the last bit of one entry (as
  // a torch build elsewhere may write it, quant/dynamic_map.cpp).
  const std::string odd = "model.layers.2.mlp.down_proj.weight";
  float changed = 0;
  rewrite_model(d / "q", [&](std::vector<OwnedTensor>& ts) {
    OwnedTensor* map = find_tensor(ts, odd + ".nested_quant_map");
    ASSERT_NE(map, nullptr);
    float v;
    std::memcpy(&v, map->bytes.data() + 4 * 200, 4);
    changed = std::nextafter(v, 2.0f);
    std::memcpy(map->bytes.data() + 4 * 200, &changed, 4);
  });
  const LlamaWeights w = load_llama_weights(d / "q", {});
  expect_scales_decode_kept_form(w);
  const SafetensorsModel m(d / "q");
  size_t checked = 0;
  for (const TensorSlot& s : expected_tensors(w.cfg)) {
    if (!s.is_block_linear) continue;
    const Quant4Tensor q = load_bnb_weight(m, s.name);
    ASSERT_TRUE(q.nested.has_value()) << s.name;
    const ops::LinearWeight& lw = linear_of(w, s);
    const NestedAbsmax kept = kept_form(lw);
    EXPECT_EQ(kept.codes, q.nested->codes) << s.name;
    EXPECT_EQ(kept.nested_absmax, q.nested->nested_absmax) << s.name;
    EXPECT_EQ(kept.code8, q.nested->code8) << s.name;
    EXPECT_EQ(std::memcmp(&kept.offset, &q.nested->offset, sizeof(float)), 0) << s.name;
    if (s.name == odd) {
      EXPECT_EQ(lw.code8[200], changed);
    }
    ++checked;
  }
  EXPECT_EQ(checked, size_t(7 * w.cfg.num_hidden_layers));
  WeightLoadOptions dq;
  EXPECT_EQ(w.arena.used(), base_weight_arena_bytes(w.cfg, dq));

  // Plain fp32 absmax in the files: nothing to keep, whatever the options ask.
  QuantizeOptions plain;
  plain.double_quant = false;
  quantize_model(d / "tiny", d / "p", plain);
  const LlamaWeights p = load_llama_weights(d / "p", dq);
  for (const ops::LinearWeight* lw : linears(p)) EXPECT_FALSE(lw->double_quant());
  WeightLoadOptions no_dq;
  no_dq.double_quant = false;
  EXPECT_EQ(p.arena.used(), base_weight_arena_bytes(p.cfg, no_dq));

  // Some tensors nested, some not: fp32 scales only (decoded where nested),
  // the same scales the all-nested checkpoint gives for the nested tensor.
  const std::string nested_one = "model.layers.0.self_attn.q_proj.weight";
  const SafetensorsModel qm(d / "q");
  rewrite_model(d / "p", [&](std::vector<OwnedTensor>& ts) {
    std::erase_if(ts, [&](const OwnedTensor& t) { return t.name.rfind(nested_one + ".", 0) == 0; });
    for (const std::string& n : qm.names())
      if (n.rfind(nested_one + ".", 0) == 0) {
        const auto b = qm.data(n);
        ts.push_back(
            {n, qm.at(n).info->dtype, qm.at(n).info->shape, std::vector<uint8_t>(b.begin(), b.end())});
      }
  });
  const LlamaWeights mixed = load_llama_weights(d / "p", dq);
  for (const ops::LinearWeight* lw : linears(mixed)) EXPECT_FALSE(lw->double_quant());
  EXPECT_EQ(mixed.arena.used(), base_weight_arena_bytes(mixed.cfg, no_dq));
  const int64_t nb = blocks_of(mixed.layers[0].q);
  EXPECT_EQ(std::memcmp(mixed.layers[0].q.absmax, w.layers[0].q.absmax, size_t(nb) * sizeof(float)), 0);
}

}  // namespace
}  // namespace qlora
