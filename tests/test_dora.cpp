// DoRA (weight-decomposed LoRA) against PEFT 0.22 itself in float64 (golden
// file), its adapter files as PEFT writes them, and the refusals where a
// format cannot hold it. Model-level gradients against finite differences
// are in test_model.cpp (ModelGrad.DoraGradientsMatchFiniteDifferences).
// DoraCases: the CPU ops on the shared cases of tests/op_cases.h (the ones the
// GPU parity tests CudaOps.Dora* use) against double precision.
// If the golden file's format changes, re-run:
//   /work/main/build/interop-venv/bin/python tests/reference/make_dora_golden.py
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "kernels/ops.h"
#include "model/builtin.h"
#include "model/lora.h"
#include "op_cases.h"
#include "test_models.h"
#include "testing.h"
#include "tools/export_gguf.h"
#include "train/peft_adapter.h"

namespace qlora {
namespace {

constexpr const char* kRegen =
    "re-run /work/main/build/interop-venv/bin/python tests/reference/make_dora_golden.py";

const SafetensorsFile& golden() {
  static const SafetensorsFile f(std::string(QLORA_SOURCE_DIR) + "/tests/reference/dora_golden.safetensors");
  return f;
}
std::vector<float> g(const std::string& name) { return testing::golden_tensor<float>(golden(), name, kRegen); }

// Tolerance: the fp32 ops against PEFT in float64 on inputs exactly
// representable in fp32. Each output is a few chained fp32 dot products of
// at most K = 24 terms (x W^T, x A^T then B, the norm's sum of squares) and
// one division, each term of order 1: about K u relative error per product,
// u = 2^-24, so a few 1e-6 of the values' scale; 2e-5 of the scale allows
// a factor of ten above that. The scale is each tensor's largest magnitude.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  float scale = 0.0f;
  for (float v : want) scale = std::max(scale, std::abs(v));
  int bad = 0;
  for (size_t i = 0; i < want.size(); ++i)
    if (!(std::abs(got[i] - want[i]) <= 2e-5f * scale) && bad++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: " << got[i] << " vs PEFT " << want[i] << " (scale " << scale << ")";
}

// The ops composed as LlamaModel::project / project_backward compose them
// without dropout: result = x W^T + b; base = result - b; lora = s x A^T B^T;
// y = result + (g-1) base + g lora; then dm, and dx = (dy g) W + the LoRA
// branch's input gradient, dA and dB from dlora = dy g.
TEST(DoraOps, ForwardAndGradientsMatchPeftFloat64) {
  const auto dims = nlohmann::json::parse(golden().metadata().at("dims"));
  const int64_t N = dims.at("N"), IN = dims.at("IN"), OUT = dims.at("OUT"), R = dims.at("R");
  const float s = std::stof(golden().metadata().at("scale"));
  const auto x = g("x"), dy = g("dy"), W = g("W"), bias = g("bias"), A = g("A"), B = g("B"), m = g("m");
  ops::LinearWeight w;
  w.out = OUT;
  w.in = IN;
  w.dense = W.data();

  // The norm at PEFT's initialisation (B = 0) and with the trained B.
  std::vector<float> panel(static_cast<size_t>(ops::kDoraPanelRows * IN));
  std::vector<float> wnorm(static_cast<size_t>(OUT)), zeroB(static_cast<size_t>(OUT * R), 0.0f);
  ops::dora_weight_norm(wnorm.data(), panel.data(), w, A.data(), zeroB.data(), s, R);
  expect_close(wnorm, g("init_norm"), "initial magnitude");
  ops::dora_weight_norm(wnorm.data(), panel.data(), w, A.data(), B.data(), s, R);
  expect_close(wnorm, g("wnorm"), "wnorm");

  std::vector<float> y(static_cast<size_t>(N * OUT)), base(y.size()), lora(y.size(), 0.0f);
  std::vector<float> h(static_cast<size_t>(N * R));
  ops::linear_forward(y.data(), x.data(), w, bias.data(), N);
  for (int64_t i = 0; i < N * OUT; ++i) base[size_t(i)] = y[size_t(i)] - bias[size_t(i % OUT)];
  ops::lora_forward(lora.data(), h.data(), x.data(), A.data(), B.data(), s, N, IN, OUT, R);
  ops::dora_forward(y.data(), base.data(), lora.data(), m.data(), wnorm.data(), N, OUT);
  expect_close(y, g("y"), "y");

  std::vector<float> dlora(y.size()), dm(static_cast<size_t>(OUT), 0.0f), dA(static_cast<size_t>(R * IN), 0.0f);
  std::vector<float> dB(static_cast<size_t>(OUT * R), 0.0f), dx(static_cast<size_t>(N * IN));
  std::vector<float> dh(static_cast<size_t>(N * R));
  ops::dora_backward(nullptr, dlora.data(), dm.data(), dy.data(), base.data(), lora.data(), m.data(), wnorm.data(), N,
                     OUT);
  ops::linear_backward(dx.data(), dlora.data(), w, N);
  ops::lora_backward(dx.data(), dA.data(), dB.data(), dh.data(), dlora.data(), h.data(), x.data(), A.data(), B.data(),
                     s, N, IN, OUT, R);
  expect_close(dm, g("dm"), "dm");
  expect_close(dA, g("dA"), "dA");
  expect_close(dB, g("dB"), "dB");
  expect_close(dx, g("dx"), "dx");
}

// In place (dbase over base, dlora over lora), as the model calls it.
TEST(DoraOps, BackwardInPlaceEqualsOutOfPlace) {
  const int64_t N = 7, OUT = 9;
  const auto dout = testing::randn(N * OUT, 1), base0 = testing::randn(N * OUT, 2), lora0 = testing::randn(N * OUT, 3);
  const std::vector<float> m = testing::randn(OUT, 4);
  std::vector<float> wn(static_cast<size_t>(OUT));
  for (int64_t j = 0; j < OUT; ++j) wn[size_t(j)] = 1.5f + 0.1f * float(j);
  std::vector<float> db(static_cast<size_t>(N * OUT)), dl(db.size()), dm1(static_cast<size_t>(OUT), 0.5f);
  std::vector<float> dm2 = dm1;
  ops::dora_backward(db.data(), dl.data(), dm1.data(), dout.data(), base0.data(), lora0.data(), m.data(), wn.data(), N,
                     OUT);
  std::vector<float> b = base0, l = lora0;
  ops::dora_backward(b.data(), l.data(), dm2.data(), dout.data(), b.data(), l.data(), m.data(), wn.data(), N, OUT);
  EXPECT_EQ(b, db);
  EXPECT_EQ(l, dl);
  EXPECT_EQ(dm1, dm2);
  for (int64_t j = 0; j < OUT; ++j) {
    double want = 0.5;
    for (int64_t i = 0; i < N; ++i)
      want += double(dout[size_t(i * OUT + j)]) * (double(base0[size_t(i * OUT + j)]) + lora0[size_t(i * OUT + j)]) /
              wn[size_t(j)];
    EXPECT_NEAR(dm1[size_t(j)], want, 1e-5 * (1 + std::abs(want)));
  }
}

// The shared cases against double precision, u = 2^-24 (fp32's unit roundoff):
//  - wnorm: each fp32 value W_jc + s (B A)_jc is R products summed, scaled and
//    added to W_jc: at most (R + 2) u T_jc off (Higham's gamma; T_jc = |W_jc| +
//    |s| sum_r |B_jr A_rc|), so the norm moves by at most (R + 2) u ||T_j||
//    (|‖x‖ - ‖y‖| <= ‖x - y‖); the double sum adds nothing visible and the
//    final rounding u wnorm <= u ||T_j||: (R + 3) u ||T_j||, doubled.
//  - out, dbase, dlora: g = m / wnorm and a few fp32 operations on it, each one
//    rounding relative to the terms: 8 u (|out0| + (|g - 1| + g) |base| + g |lora|)
//    and 4 u |dout| (|g - 1| + g).
//  - dm: the double column sum (N 2^-53 of its terms, bounded by N 2^-50) is
//    divided and rounded once to fp32, then added to dm0 in fp32: 2 u (|dm0| +
//    |sum|) + N 2^-50 sum |terms| / wnorm.
TEST(DoraCases, CpuOpsMatchDouble) {
  using namespace op_cases;
  const double u = std::ldexp(1.0, -24);
  for (const DoraCase& c : dora_cases()) {
    const std::string what = describe("dora", c);
    const DoraRun r = dora_cpu(c);
    const std::vector<double> terms = dora_norm_terms(c, r);
    for (int64_t j = 0; j < c.OUT; ++j) {
      double ss = 0.0;
      for (int64_t i = 0; i < c.IN; ++i) {
        double v = r.w[size_t(j * c.IN + i)];
        for (int64_t k = 0; k < c.R; ++k)
          v += double(c.scale) * r.B[size_t(j * c.R + k)] * r.A[size_t(k * c.IN + i)];
        ss += v * v;
      }
      ASSERT_NEAR(r.wnorm[size_t(j)], std::sqrt(ss), 2 * double(c.R + 3) * u * terms[size_t(j)]) << what << " row " << j;
    }
    for (int64_t j = 0; j < c.OUT; ++j) {
      const double wn = r.wnorm[size_t(j)], g = double(r.m[size_t(j)]) / wn;
      double sum = 0.0, size = 0.0;
      for (int64_t i = 0; i < c.N; ++i) {
        const size_t k = size_t(i * c.OUT + j);
        const double b = r.base[k], l = r.lora[k], d = r.dout[k];
        const double out = r.out0[k] + (g - 1.0) * b + g * l;
        const double out_terms = std::abs(r.out0[k]) + (std::abs(g - 1.0) + g) * std::abs(b) + g * std::abs(l);
        ASSERT_NEAR(r.out[k], out, 8 * u * out_terms) << what << " out " << k;
        ASSERT_NEAR(r.dbase[k], d * (g - 1.0), 4 * u * std::abs(d) * (std::abs(g - 1.0) + g)) << what << " " << k;
        ASSERT_NEAR(r.dlora[k], d * g, 4 * u * std::abs(d) * (std::abs(g - 1.0) + g)) << what << " " << k;
        sum += d * (b + l);
        size += std::abs(d) * (std::abs(b) + std::abs(l));
      }
      const double dm = r.dm0[size_t(j)] + sum / wn;
      ASSERT_NEAR(r.dm[size_t(j)], dm,
                  2 * u * (std::abs(r.dm0[size_t(j)]) + std::abs(sum / wn)) + double(c.N) * std::ldexp(size / wn, -50))
          << what << " dm " << j;
    }
  }
}

// PEFT 0.22 writes use_dora: true and one ...lora_magnitude_vector [out]
// per adapted module (no ".weight"; checked against PEFT's own save in
// tests/interop/test_peft.py).
TEST(DoraAdapter, SavedAsPeftSavesItAndReadBackBitForBit) {
  const ModelConfig cfg = testing::tiny_gqa_config(2);
  LoraConfig lc;
  lc.rank = 4;
  lc.alpha = 8;
  lc.dora = true;
  lc.rank_pattern = {{"down_proj", 2}};
  const LoraWeights w = testing::random_lora(cfg, lc, 7);
  testing::ScratchDir dir;
  save_peft_adapter(w, cfg, dir / "a", "base");
  const auto j = nlohmann::json::parse(testing::read_bytes(dir / "a" / "adapter_config.json"));
  EXPECT_EQ(j.at("use_dora"), true);
  {
    const SafetensorsFile st(dir / "a" / "adapter_model.safetensors");
    EXPECT_EQ(st.tensors().size(), size_t(2 * 7 * 3));
    const TensorInfo* t = st.find("base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->shape, (Shape{32}));
    EXPECT_NE(st.find("base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector"), nullptr);
  }
  const LoraWeights r = LoraWeights::load_peft(dir / "a", cfg);
  EXPECT_TRUE(r.config().dora);
  ASSERT_EQ(r.flat_size(), w.flat_size());
  EXPECT_EQ(std::memcmp(r.flat_params(), w.flat_params(), w.flat_size() * sizeof(float)), 0);
  // A run with plain LoRA cannot continue from it, nor the other way round.
  LoraConfig plain = lc;
  plain.dora = false;
  const std::string e = testing::error_of([&] { load_matching_adapter(dir / "a", LoraWeights(cfg, plain), cfg); });
  EXPECT_NE(e.find("the adapter has use_dora=1, this run uses lora.dora: 0"), std::string::npos) << e;
}

TEST(DoraAdapter, MissingOrUnannouncedMagnitudesAreRefusedByName) {
  const ModelConfig cfg = testing::tiny_gqa_config(2);
  LoraConfig lc;
  lc.dora = true;
  const LoraWeights w = testing::random_lora(cfg, lc, 9);
  testing::ScratchDir dir;
  save_peft_adapter(w, cfg, dir / "a", "base");
  auto j = nlohmann::json::parse(testing::read_bytes(dir / "a" / "adapter_config.json"));
  j["use_dora"] = false;
  testing::write_bytes(dir / "a" / "adapter_config.json", j.dump());
  std::string e = testing::error_of([&] { LoraWeights::load_peft(dir / "a", cfg); });
  EXPECT_NE(e.find("lora_magnitude_vector (a DoRA magnitude, but adapter_config.json does not say use_dora: true)"),
            std::string::npos)
      << e;
  lc.dora = false;
  const LoraWeights plain = testing::random_lora(cfg, lc, 9);
  save_peft_adapter(plain, cfg, dir / "b", "base");
  auto jb = nlohmann::json::parse(testing::read_bytes(dir / "b" / "adapter_config.json"));
  jb["use_dora"] = true;
  testing::write_bytes(dir / "b" / "adapter_config.json", jb.dump());
  e = testing::error_of([&] { LoraWeights::load_peft(dir / "b", cfg); });
  EXPECT_NE(e.find("tensor base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector is missing "
                   "(use_dora is true in adapter_config.json)"),
            std::string::npos)
      << e;
}

// llama.cpp's adapter GGUF has lora_a/lora_b and one alpha, nothing for the
// magnitudes: the export is refused by use_dora (docs/adapters.md says what
// llama.cpp's converter and loader do with such a tensor).
TEST(DoraAdapter, GgufAdapterExportIsRefusedByName) {
  testing::ScratchDir dir;
  write_builtin_model("tiny", dir / "tiny");
  const ModelConfig cfg = load_model_config(dir / "tiny");
  LoraConfig lc;
  lc.dora = true;
  save_peft_adapter(testing::random_lora(cfg, lc, 3), cfg, dir / "a", (dir / "tiny").string());
  AdapterExportOptions opt;
  opt.model = dir / "tiny";
  const std::string e = testing::error_of([&] { export_adapter_gguf(dir / "a", dir / "a.gguf", opt); });
  EXPECT_NE(e.find("adapter_config.json: use_dora is true; llama.cpp's LoRA adapter GGUF has no DoRA magnitudes"),
            std::string::npos)
      << e;
  EXPECT_FALSE(std::filesystem::exists(dir / "a.gguf"));
}

}  // namespace
}  // namespace qlora
