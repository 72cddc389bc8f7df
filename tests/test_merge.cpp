// `qlora merge`: the merged folder computes what base + adapter computes
// (within the rounding of the merged weights to the output dtype), copies
// every other tensor untouched, merges onto the dequantized weights of a
// 4-bit checkpoint, shards like quantize, and refuses bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/builtin.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/tensor_table.h"
#include "model/weights.h"
#include "test_models.h"
#include "testing.h"
#include "tools/merge_model.h"
#include "tools/quantize_model.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::random_lora;
using testing::run_qlora;
using testing::ScratchDir;

std::vector<float> as_f32(const SafetensorsModel& m, const std::string& name) {
  const auto& e = m.at(name);
  std::vector<float> v(static_cast<size_t>(e.info->numel()));
  convert_to_f32(e.file->data(*e.info).data(), e.info->dtype, v.size(), v.data());
  return v;
}

// A PEFT adapter folder as PEFT writes it (F32 tensors, PEFT names).
void write_adapter(const fs::path& dir, const ModelConfig& cfg, const LoraWeights& w) {
  const LoraConfig& lc = w.config();
  std::vector<OwnedTensor> tensors;
  nlohmann::json modules = nlohmann::json::array();
  for (int t = 0; t < kNumLoraTargets; ++t) {
    if (!w.has(LoraTarget(t))) continue;
    modules.push_back(std::string(lora_target_module(LoraTarget(t))));
    const auto [in, out] = lora_target_dims(cfg, LoraTarget(t));
    for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
      for (bool is_a : {true, false}) {
        const float* p = is_a ? w.A(l, LoraTarget(t)) : w.B(l, LoraTarget(t));
        const Shape shape = is_a ? Shape{lc.rank, in} : Shape{out, lc.rank};
        OwnedTensor o{w.peft_name(l, LoraTarget(t), is_a), DType::F32, shape,
                      std::vector<uint8_t>(static_cast<size_t>(shape_numel(shape)) * 4)};
        std::memcpy(o.bytes.data(), p, o.bytes.size());
        tensors.push_back(std::move(o));
      }
  }
  fs::create_directories(dir);
  save_safetensors(dir / "adapter_model.safetensors", tensors);
  const nlohmann::json j = {{"peft_type", "LORA"},     {"r", lc.rank},
                            {"lora_alpha", lc.alpha},  {"lora_dropout", lc.dropout},
                            {"use_rslora", lc.rslora}, {"target_modules", modules},
                            {"bias", "none"},          {"task_type", "CAUSAL_LM"}};
  testing::write_bytes(dir / "adapter_config.json", j.dump(2));
}

// Targets q, v, o, gate, down: k and up stay unadapted, so the test also sees
// block linears that must be copied untouched.
LoraConfig partial_config(int64_t rank, double alpha, bool rslora) {
  LoraConfig lc;
  lc.rank = rank;
  lc.alpha = alpha;
  lc.rslora = rslora;
  lc.targets = {true, false, true, true, true, false, true};
  return lc;
}

struct Fixture {
  ScratchDir dir;
  ModelConfig cfg;
  std::unique_ptr<LoraWeights> lora;
  explicit Fixture(LoraConfig lc = partial_config(4, 8.0, false)) {
    write_builtin_model("tiny", dir / "base");
    // A tokenizer-ish side file, to see side files copied.
    testing::write_bytes(dir / "base" / "tokenizer_config.json", "{\"model_max_length\": 512}\n");
    cfg = load_model_config(dir / "base");
    lora = std::make_unique<LoraWeights>(random_lora(cfg, lc, 7, 0.05f));
    write_adapter(dir / "adapter", cfg, *lora);
  }
};

std::vector<float> as_f16_rounded(const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  convert_from_f32(x.data(), x.size(), DType::F16, h.data());
  std::vector<float> y(x.size());
  convert_to_f32(h.data(), DType::F16, h.size(), y.data());
  return y;
}

// Checks merged = W + scale * B A for an (OUT, IN) weight against a double
// reference. Bound per element: the fp32 computation (R products summed, a
// scale multiply and the add: R + 2 roundings of at most u32 = 2^-24 of the
// magnitudes involved) plus the one rounding to the output dtype: half an
// ulp, out_u |x| (2^-8 for bf16's 8 significant bits, 2^-11 for f16, 2^-24
// for f32), or at most out_abs where the result is subnormal (f16 below
// 2^-14: half its smallest step, 2^-25).
void expect_merged(const std::vector<float>& merged, const std::vector<float>& W, const LoraWeights& lora,
                   int64_t l, LoraTarget t, int64_t IN, double out_u, const std::string& name,
                   double out_abs = 0) {
  const int64_t R = lora.config().rank;
  const double s = lora.config().scale();
  const float *A = lora.A(l, t), *B = lora.B(l, t);
  const int64_t OUT = int64_t(W.size()) / IN;
  double worst = 0;
  for (int64_t o = 0; o < OUT; ++o)
    for (int64_t i = 0; i < IN; ++i) {
      double d = 0, mag = 0;
      for (int64_t r = 0; r < R; ++r) {
        d += double(B[o * R + r]) * A[r * IN + i];
        mag += std::fabs(double(B[o * R + r]) * A[r * IN + i]);
      }
      const double ref = W[size_t(o * IN + i)] + s * d;
      const double tol = out_abs + out_u * std::fabs(ref) +
                         double(R + 3) * 0x1p-24 * (std::fabs(W[size_t(o * IN + i)]) + s * mag);
      const double err = std::fabs(merged[size_t(o * IN + i)] - ref);
      worst = std::max(worst, err / tol);
      if (err > tol) {
        ADD_FAILURE() << name << "[" << o << ", " << i << "] = " << merged[size_t(o * IN + i)]
                      << ", expected " << ref << " within " << tol;
        return;
      }
    }
  EXPECT_GT(worst, 0.0) << name << ": no rounding at all is suspicious (was the adapter applied?)";
}

std::vector<float> logits_of(const LlamaWeights& w, LoraWeights* lora, const std::vector<int32_t>& tokens) {
  LlamaModel m(w, lora, 1, int64_t(tokens.size()));
  std::vector<float> out(tokens.size() * static_cast<size_t>(w.cfg.vocab_size));
  m.logits(out.data(), {tokens.data(), nullptr, nullptr, 1, int64_t(tokens.size())});
  return out;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

TEST(Merge, Bf16MergeMatchesBasePlusAdapter) {
  Fixture fx;
  const MergeReport r = merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "merged", {});
  EXPECT_EQ(r.merged_tensors, 5 * fx.cfg.num_hidden_layers);
  EXPECT_FALSE(r.from_4bit);
  EXPECT_EQ(r.shards, 1);
  EXPECT_TRUE(fs::exists(fx.dir / "merged" / "generation_config.json"));
  EXPECT_TRUE(fs::exists(fx.dir / "merged" / "tokenizer_config.json"));
  EXPECT_FALSE(fs::exists(fx.dir / "merged" / "model.safetensors.index.json"));
  const ModelConfig mcfg = load_model_config(fx.dir / "merged");
  EXPECT_EQ(mcfg.torch_dtype, "bfloat16");
  EXPECT_FALSE(mcfg.quantization.has_value());

  const SafetensorsModel in(fx.dir / "base"), out(fx.dir / "merged");
  ASSERT_EQ(in.names(), out.names());
  for (const TensorSlot& s : expected_tensors(fx.cfg)) {
    SCOPED_TRACE(s.name);
    EXPECT_EQ(out.at(s.name).info->dtype, DType::BF16);
    const auto tg = lora_target_of(s.kind);
    if (s.is_block_linear && tg && fx.lora->has(*tg)) {
      expect_merged(as_f32(out, s.name), as_f32(in, s.name), *fx.lora, s.layer, *tg, s.shape[1], 0x1p-8,
                    s.name);
    } else {
      const auto a = in.data(s.name), b = out.data(s.name);
      EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << "not bit-identical";
    }
  }

  // The merged model computes what base + adapter computes. Each merged weight
  // is the exact W' rounded once to bf16: a relative perturbation of at most
  // u = 2^-8, uniformly spread, so of RMS at most u/sqrt(3). To first order
  // each of the 5 rounded linears per layer adds an independent relative error
  // of that RMS to its output (a sum of IN independent errors, relative to a
  // sum of IN terms of the same size), and the residual stream carries them to
  // the logits without amplification (RMSNorm renormalizes), so the normwise
  // relative error of the logits is about u/sqrt(3) * sqrt(5 L); the bound
  // allows 4 times that.
  // The same comparison with an f32 merge leaves only fp32 rounding (1e-5).
  const std::vector<int32_t> tokens = {1, 17, 300, 42, 5, 99, 511, 0, 256, 3, 77, 128, 64, 2, 33, 450};
  WeightLoadOptions dense;
  dense.quantize = false;
  const LlamaWeights base = load_llama_weights(fx.dir / "base", dense);
  const LlamaWeights merged = load_llama_weights(fx.dir / "merged", dense);
  const auto ref = logits_of(base, fx.lora.get(), tokens);
  const auto got = logits_of(merged, nullptr, tokens);
  const double tol = 4 * 0x1p-8 / std::sqrt(3.0) * std::sqrt(5.0 * double(fx.cfg.num_hidden_layers));
  const double err = rel_diff(got, ref);
  EXPECT_LE(err, tol);
  // The adapter's own effect is far above that tolerance: a merge that lost
  // it (or used a wrong scale) would fail.
  const double effect = rel_diff(logits_of(base, nullptr, tokens), ref);
  EXPECT_GT(effect, 10 * tol) << "adapter too weak for this test to mean anything";
  std::printf("[          ] logits: bf16 merge rel err %.3g (bound %.3g), adapter effect %.3g\n", err, tol,
              effect);

  MergeOptions f32;
  f32.dtype = DType::F32;
  merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "merged32", f32);
  EXPECT_EQ(load_model_config(fx.dir / "merged32").torch_dtype, "float32");
  const LlamaWeights merged32 = load_llama_weights(fx.dir / "merged32", dense);
  EXPECT_LE(rel_diff(logits_of(merged32, nullptr, tokens), ref), 1e-5);
}

TEST(Merge, RsloraScaleAndF16) {
  Fixture fx(partial_config(8, 16.0, true));
  ASSERT_FLOAT_EQ(fx.lora->config().scale(), float(16.0 / std::sqrt(8.0)));
  MergeOptions opt;
  opt.dtype = DType::F16;
  merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "merged", opt);
  const SafetensorsModel in(fx.dir / "base"), out(fx.dir / "merged");
  EXPECT_EQ(load_model_config(fx.dir / "merged").torch_dtype, "float16");
  for (const TensorSlot& s : expected_tensors(fx.cfg)) {
    SCOPED_TRACE(s.name);
    EXPECT_EQ(out.at(s.name).info->dtype, DType::F16);
    const auto tg = lora_target_of(s.kind);
    if (s.is_block_linear && tg && fx.lora->has(*tg))
      expect_merged(as_f32(out, s.name), as_f32(in, s.name), *fx.lora, s.layer, *tg, s.shape[1], 0x1p-11,
                    s.name, 0x1p-25);
    else  // one rounding of the bf16 value to f16 (inexact only for tiny values, f16 subnormals)
      EXPECT_EQ(as_f32(out, s.name), as_f16_rounded(as_f32(in, s.name)));
  }
}

TEST(Merge, FromA4BitCheckpointUsesTheDequantizedWeights) {
  Fixture fx;
  quantize_model(fx.dir / "base", fx.dir / "nf4", {});
  MergeOptions opt;
  opt.dtype = DType::F32;
  const MergeReport r = merge_model(fx.dir / "nf4", fx.dir / "adapter", fx.dir / "merged", opt);
  EXPECT_TRUE(r.from_4bit);
  const ModelConfig mcfg = load_model_config(fx.dir / "merged");
  EXPECT_FALSE(mcfg.quantization.has_value()) << "quantization_config must be gone";
  EXPECT_EQ(mcfg.torch_dtype, "float32");
  const auto cj = nlohmann::json::parse(testing::read_bytes(fx.dir / "merged" / "config.json"));
  EXPECT_FALSE(cj.contains("quantization_config"));

  // Reference W: the loader's dequantization of the same checkpoint.
  WeightLoadOptions dense;
  dense.quantize = false;
  const LlamaWeights deq = load_llama_weights(fx.dir / "nf4", dense);
  const SafetensorsModel out(fx.dir / "merged"), base(fx.dir / "base");
  EXPECT_EQ(out.names(), base.names()) << "a plain folder: no 4-bit companions";
  double nf4_err = 0, nf4_mag = 0;
  for (const TensorSlot& s : expected_tensors(fx.cfg)) {
    SCOPED_TRACE(s.name);
    const auto got = as_f32(out, s.name);
    if (!s.is_block_linear) {  // BF16 in the checkpoint -> F32: exact
      EXPECT_EQ(got, as_f32(base, s.name));
      continue;
    }
    const LlamaLayerWeights& L = deq.layers[size_t(s.layer)];
    const ops::LinearWeight* lw[] = {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
    const auto tg = *lora_target_of(s.kind);
    const float* d = lw[int(tg)]->dense;
    const std::vector<float> W(d, d + shape_numel(s.shape));
    if (fx.lora->has(tg))
      expect_merged(got, W, *fx.lora, s.layer, tg, s.shape[1], 0x1p-24, s.name);
    else
      EXPECT_EQ(got, W) << "unadapted 4-bit weight: its dequantized value";
    const auto orig = as_f32(base, s.name);
    for (size_t i = 0; i < W.size(); ++i)
      nf4_err += double(W[i] - orig[i]) * (W[i] - orig[i]), nf4_mag += double(orig[i]) * orig[i];
  }
  // The NF4 error baked into this merge (docs/adapters.md quotes it).
  const double rel = std::sqrt(nf4_err / nf4_mag);
  std::printf("[          ] NF4 quantization error in the merged linears: %.3g relative (normwise)\n", rel);
  EXPECT_GT(rel, 0.01);
  EXPECT_LT(rel, 0.2);
}

TEST(Merge, ShardsWithASmallShardSize) {
  Fixture fx;
  merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "one", {});
  MergeOptions many;
  many.max_shard_bytes = 100 * 1024;
  const MergeReport r = merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "many", many);
  EXPECT_GT(r.shards, 3);
  char first[64];
  std::snprintf(first, sizeof first, "model-00001-of-%05lld.safetensors", static_cast<long long>(r.shards));
  EXPECT_TRUE(fs::exists(fx.dir / "many" / first)) << first;
  EXPECT_FALSE(fs::exists(fx.dir / "many" / "model.safetensors"));
  const auto index =
      nlohmann::json::parse(testing::read_bytes(fx.dir / "many" / "model.safetensors.index.json"));
  const SafetensorsModel a(fx.dir / "one"), b(fx.dir / "many");
  ASSERT_EQ(a.names(), b.names());
  EXPECT_EQ(index.at("weight_map").size(), a.names().size());
  EXPECT_EQ(index.at("metadata").at("total_size").get<uint64_t>(), a.total_bytes());
  // Every shard within the limit (plus its header), but for a tensor larger
  // than the limit, which gets a shard of its own.
  for (const auto& f : b.files()) {
    if (f->tensors().size() > 1) {
      EXPECT_LE(f->file_size(), many.max_shard_bytes + 4096) << f->path();
    }
  }
  for (const auto& n : a.names()) {
    const auto x = a.data(n), y = b.data(n);
    EXPECT_TRUE(std::equal(x.begin(), x.end(), y.begin(), y.end())) << n;
  }
  WeightLoadOptions dense;
  dense.quantize = false;
  EXPECT_NO_THROW(load_llama_weights(fx.dir / "many", dense));
}

size_t entries_in(const fs::path& d) {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(d)) ++n;
  return n;
}

TEST(Merge, Refusals) {
  Fixture fx;
  // Existing output: refused without overwrite, left as it was.
  fs::create_directories(fx.dir / "out");
  testing::write_bytes(fx.dir / "out" / "keep.txt", "x");
  std::string e =
      testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "out", {}); });
  EXPECT_NE(e.find("out"), std::string::npos) << e;
  EXPECT_NE(e.find("--overwrite"), std::string::npos) << e;
  EXPECT_TRUE(fs::exists(fx.dir / "out" / "keep.txt"));
  MergeOptions ow;
  ow.overwrite = true;
  merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "out", ow);
  EXPECT_FALSE(fs::exists(fx.dir / "out" / "keep.txt"));
  EXPECT_TRUE(fs::exists(fx.dir / "out" / "model.safetensors"));
  // Never onto the model or the adapter itself.
  e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "adapter", ow); });
  EXPECT_NE(e.find("must differ"), std::string::npos) << e;

  // An adapter for another model: the stories-like shapes of a different config.
  ModelConfig other = fx.cfg;
  other.hidden_size = 64;
  other.head_dim = 16;
  const LoraWeights wrong = random_lora(other, partial_config(4, 8.0, false), 3, 0.05f);
  write_adapter(fx.dir / "wrong", other, wrong);
  e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "wrong", fx.dir / "m1", {}); });
  EXPECT_NE(e.find("q_proj.lora_A.weight"), std::string::npos) << e;
  EXPECT_NE(e.find("expected"), std::string::npos) << e;
  // Fewer layers in the adapter's model: a missing tensor, named.
  ModelConfig shallow = fx.cfg;
  shallow.num_hidden_layers = 2;
  write_adapter(fx.dir / "shallow", shallow, random_lora(shallow, partial_config(4, 8.0, false), 3, 0.05f));
  e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "shallow", fx.dir / "m2", {}); });
  EXPECT_NE(e.find("layers.2."), std::string::npos) << e;
  // Missing files, named.
  e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "nope", fx.dir / "m3", {}); });
  EXPECT_NE(e.find("nope"), std::string::npos) << e;
  fs::create_directories(fx.dir / "empty_adapter");
  e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "empty_adapter", fx.dir / "m4", {}); });
  EXPECT_NE(e.find("adapter_config.json"), std::string::npos) << e;
  fs::copy_file(fx.dir / "adapter" / "adapter_config.json", fx.dir / "empty_adapter" / "adapter_config.json");
  e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "empty_adapter", fx.dir / "m5", {}); });
  EXPECT_NE(e.find("adapter_model.safetensors"), std::string::npos) << e;
  e = testing::error_of(
      [&] { merge_model(fx.dir / "missing_model", fx.dir / "adapter", fx.dir / "m6", {}); });
  EXPECT_NE(e.find("missing_model"), std::string::npos) << e;
  EXPECT_THROW(merge_dtype_from_name("int8"), Error);
  // Nothing half-written: only the folders made above.
  EXPECT_EQ(entries_in(fx.dir.path()), 6u);
}

TEST(MergeCli, MergesAndRefuses) {
  Fixture fx;
  const std::string cache = "QLORA_CACHE='" + (fx.dir / "cache").string() + "'";
  const std::string common = "--model builtin:tiny --adapter '" + (fx.dir / "adapter").string() + "' -o '" +
                             (fx.dir / "cli").string() + "'";
  auto r = run_qlora("merge " + common + " --dtype f32", cache);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("20 linear weights"), std::string::npos) << r.output;
  EXPECT_EQ(load_model_config(fx.dir / "cli").torch_dtype, "float32");
  // The cached builtin:tiny is the same model as the fixture's base.
  const SafetensorsModel a(fx.dir / "cli");
  MergeOptions f32;
  f32.dtype = DType::F32;
  merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "lib", f32);
  const SafetensorsModel b(fx.dir / "lib");
  for (const auto& n : a.names()) {
    const auto x = a.data(n), y = b.data(n);
    EXPECT_TRUE(std::equal(x.begin(), x.end(), y.begin(), y.end())) << n;
  }
  r = run_qlora("merge " + common, cache);
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("--overwrite"), std::string::npos) << r.output;
  r = run_qlora("merge " + common + " --overwrite", cache);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(load_model_config(fx.dir / "cli").torch_dtype, "bfloat16");
}

}  // namespace
}  // namespace qlora
