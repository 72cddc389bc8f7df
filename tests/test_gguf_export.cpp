// GGUF out: `qlora export --format gguf` (llama.cpp's LoRA adapter GGUF) and
// `qlora merge --format gguf` (a complete GGUF model), read back through our
// GGUF reader: the adapter's metadata and tensors (names, ggml shapes, values,
// q/k row order, alpha for LoRA and rsLoRA); the merged model equal to the HF
// merge within the dtype's rounding; config and tokenizer round trips through
// the metadata; generation from the merged GGUF equal to base + adapter; bad
// input refused with nothing written. Whether llama.cpp itself loads the files
// is tests/interop/'s job (llama-cpp-python).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/dtype.h"
#include "core/error.h"
#include "io/gguf.h"
#include "io/gguf_config.h"
#include "io/gguf_writer.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/builtin.h"
#include "model/tensor_table.h"
#include "model/weights.h"
#include "quant/ggml_quants.h"
#include "recipe/recipe.h"
#include "test_models.h"
#include "testing.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/tokenizer.h"
#include "tools/export_gguf.h"
#include "tools/gguf_metadata.h"
#include "tools/merge_model.h"
#include "train/peft_adapter.h"
#include "train/trainer.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::random_lora;
using testing::run_qlora;
using testing::ScratchDir;

LoraConfig all_targets(int64_t rank, double alpha, bool rslora) {
  LoraConfig lc;
  lc.rank = rank;
  lc.alpha = alpha;
  lc.rslora = rslora;
  return lc;
}

// builtin:tiny (GQA: 4 query heads, 2 key/value heads of 32) and a random
// adapter on every linear, saved as `qlora run` saves one, naming the base folder.
struct Fixture {
  ScratchDir dir;
  ModelConfig cfg;
  std::unique_ptr<LoraWeights> lora;
  explicit Fixture(LoraConfig lc = all_targets(4, 8.0, false)) {
    write_builtin_model("tiny", dir / "base");
    cfg = load_model_config(dir / "base");
    lora = std::make_unique<LoraWeights>(random_lora(cfg, lc, 11, 0.05f));
    save_peft_adapter(*lora, cfg, dir / "adapter", (dir / "base").string());
  }
};

std::vector<float> tensor_f32(const GgufFile& f, const std::string& name) {
  const GgufTensorInfo* t = f.find_tensor(name);
  if (!t) {
    ADD_FAILURE() << "no tensor " << name << " in " << f.path();
    return {};
  }
  std::vector<float> v(size_t(t->numel()));
  ggml_dequantize(t->type, f.data(*t).data(), t->numel(), v.data());
  return v;
}

// The gguf row of HF row r for a q/k projection of `heads` heads (llama.cpp's
// converter: each head's rows reshaped (2, D/2) and swapped to (D/2, 2)).
int64_t gguf_row(int64_t r, int64_t rows, int64_t heads) {
  const int64_t D = rows / heads, h = r / D, j = r % D, s = j / (D / 2), i = j % (D / 2);
  return h * D + 2 * i + s;
}

std::string module_of(LoraTarget t, int64_t l) {
  static const char* names[] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                "ffn_gate", "ffn_up", "ffn_down"};
  return "blk." + std::to_string(l) + "." + names[int(t)] + ".weight";
}

TEST(GgufExport, AdapterMetadataTensorsAndQkOrder) {
  Fixture fx;
  const fs::path out = fx.dir / "adapter.gguf";
  // No --model: the base comes from adapter_config.json's base_model_name_or_path.
  const AdapterExportReport r = export_adapter_gguf(fx.dir / "adapter", out, {});
  EXPECT_EQ(r.architecture, "llama");
  EXPECT_EQ(r.tensors, 2 * kNumLoraTargets * fx.cfg.num_hidden_layers);
  const GgufFile f(out);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_string("general.type"), "adapter");
  EXPECT_EQ(f.get_string("adapter.type"), "lora");
  ASSERT_NE(f.find("adapter.lora.alpha"), nullptr);
  EXPECT_EQ(f.find("adapter.lora.alpha")->type, GgufType::F32);  // llama.cpp reads it with gguf_get_val_f32
  EXPECT_EQ(f.get_float("adapter.lora.alpha"), 8.0);
  EXPECT_EQ(f.tensors().size(), size_t(r.tensors));

  const int64_t R = 4;
  for (int64_t l = 0; l < fx.cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const LoraTarget tg = LoraTarget(t);
      const auto [in, out_dim] = lora_target_dims(fx.cfg, tg);
      const std::string base = module_of(tg, l);
      const GgufTensorInfo* a = f.find_tensor(base + ".lora_a");
      const GgufTensorInfo* b = f.find_tensor(base + ".lora_b");
      ASSERT_TRUE(a && b) << base;
      // llama.cpp: base ne[0] == a ne[0] (in), base ne[1] == b ne[1] (out), a ne[1] == b ne[0] (r).
      EXPECT_EQ(a->ne, (std::vector<int64_t>{in, R})) << base;
      EXPECT_EQ(b->ne, (std::vector<int64_t>{R, out_dim})) << base;
      EXPECT_EQ(a->type, GgmlType::F32);
      const std::vector<float> av = tensor_f32(f, a->name), bv = tensor_f32(f, b->name);
      const float* A = fx.lora->A(l, tg);
      const float* B = fx.lora->B(l, tg);
      EXPECT_TRUE(std::equal(av.begin(), av.end(), A)) << a->name << ": lora_a is A as is";
      const int64_t heads = tg == LoraTarget::Q   ? fx.cfg.num_attention_heads
                            : tg == LoraTarget::K ? fx.cfg.num_key_value_heads
                                                  : 0;
      for (int64_t o = 0; o < out_dim; ++o) {
        const int64_t g = heads ? gguf_row(o, out_dim, heads) : o;
        for (int64_t k = 0; k < R; ++k)
          ASSERT_EQ(bv[size_t(g * R + k)], B[o * R + k])
              << b->name << " HF row " << o << " -> gguf row " << g;
      }
    }
}

TEST(GgufExport, RsloraAlphaGivesPeftsScaleAndHalfTypes) {
  Fixture fx(all_targets(16, 8.0, true));
  AdapterExportOptions opt;
  opt.model = fx.dir / "base";
  const AdapterExportReport r = export_adapter_gguf(fx.dir / "adapter", fx.dir / "rs.gguf", opt);
  const GgufFile f(fx.dir / "rs.gguf");
  const double alpha = f.get_float("adapter.lora.alpha");
  EXPECT_EQ(alpha, 32.0);  // 8 * sqrt(16)
  EXPECT_EQ(r.written_alpha, 32.0);
  // llama.cpp's alpha / r (rank from lora_b's ne[0]) equals PEFT's alpha / sqrt(r).
  const int64_t rank = f.find_tensor("blk.0.attn_q.weight.lora_b")->ne[0];
  EXPECT_FLOAT_EQ(float(alpha / double(rank)), fx.lora->config().scale());

  for (GgmlType t : {GgmlType::F16, GgmlType::BF16}) {
    opt.type = t;
    const fs::path out = fx.dir / (std::string(ggml_type_name(t)) + ".gguf");
    export_adapter_gguf(fx.dir / "adapter", out, opt);
    const GgufFile h(out);
    const GgufTensorInfo* a = h.find_tensor("blk.1.ffn_up.weight.lora_a");
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->type, t);
    const std::vector<float> got = tensor_f32(h, a->name);
    const float* A = fx.lora->A(1, LoraTarget::Up);
    const double u = t == GgmlType::F16 ? 0x1p-11 : 0x1p-8;  // half an ulp, relative
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_LE(std::fabs(got[i] - A[i]), u * std::fabs(A[i]) + 1e-12)
          << ggml_type_name(t) << " [" << i << "]";
  }
}

TEST(GgufExport, AdapterRefusals) {
  Fixture fx;
  // Existing output: refused without --overwrite, untouched.
  testing::write_bytes(fx.dir / "taken.gguf", "keep");
  std::string e =
      testing::error_of([&] { export_adapter_gguf(fx.dir / "adapter", fx.dir / "taken.gguf", {}); });
  EXPECT_NE(e.find("--overwrite"), std::string::npos) << e;
  EXPECT_EQ(testing::read_bytes(fx.dir / "taken.gguf"), "keep");

  // A base that does not match (another hidden size): the tensor is named, nothing written.
  ModelConfig other = fx.cfg;
  other.hidden_size = 64;
  other.head_dim = 16;
  save_peft_adapter(random_lora(other, all_targets(4, 8.0, false), 3, 0.05f), other, fx.dir / "wrong",
                    (fx.dir / "base").string());
  e = testing::error_of([&] { export_adapter_gguf(fx.dir / "wrong", fx.dir / "w.gguf", {}); });
  EXPECT_NE(e.find("lora_A.weight"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(fx.dir / "w.gguf"));

  // No base anywhere: ask for --model.
  save_peft_adapter(*fx.lora, fx.cfg, fx.dir / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct");
  e = testing::error_of([&] { export_adapter_gguf(fx.dir / "hub", fx.dir / "h.gguf", {}); });
  EXPECT_NE(e.find("--model"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(fx.dir / "h.gguf"));
  AdapterExportOptions with_model;
  with_model.model = fx.dir / "base";
  export_adapter_gguf(fx.dir / "hub", fx.dir / "h.gguf", with_model);
  EXPECT_TRUE(fs::exists(fx.dir / "h.gguf"));

  // alpha 0 would mean "unscaled" to llama.cpp.
  LoraWeights zero(fx.cfg, all_targets(4, 0.0, false));
  save_peft_adapter(zero, fx.cfg, fx.dir / "zero", (fx.dir / "base").string());
  e = testing::error_of([&] { export_adapter_gguf(fx.dir / "zero", fx.dir / "z.gguf", {}); });
  EXPECT_NE(e.find("lora_alpha is 0"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(fx.dir / "z.gguf"));

  // Unwritable output: a missing folder, then a full disk; nothing left behind.
  e = testing::error_of([&] { export_adapter_gguf(fx.dir / "adapter", fx.dir / "no" / "a.gguf", {}); });
  EXPECT_NE(e.find("no/a.gguf"), std::string::npos) << e;
  {
    testing::FileSizeLimit limit(4096);
    e = testing::error_of([&] { export_adapter_gguf(fx.dir / "adapter", fx.dir / "full.gguf", {}); });
  }
  EXPECT_FALSE(e.empty());
  EXPECT_FALSE(fs::exists(fx.dir / "full.gguf"));
  for (const auto& entry : fs::directory_iterator(fx.dir.path()))
    EXPECT_EQ(entry.path().string().find(".tmp-"), std::string::npos) << entry.path();

  EXPECT_THROW(adapter_gguf_type_from_name("q4_0"), Error);
  EXPECT_THROW(merge_format_from_name("onnx"), Error);
  MergeOptions q8;
  set_merge_dtype(q8, "q8_0");
  e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "m", q8); });
  EXPECT_NE(e.find("--format gguf"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(fx.dir / "m"));
}

// ---- merged GGUF models ----

// Every base tensor of a loaded dense model, by slot order.
std::vector<std::pair<std::string, std::vector<float>>> dense_tensors(const LlamaWeights& w) {
  const ModelConfig& c = w.cfg;
  std::vector<std::pair<std::string, std::vector<float>>> out;
  auto add = [&](const std::string& n, const float* p, int64_t count) {
    if (p) out.emplace_back(n, std::vector<float>(p, p + count));
  };
  add("embed", w.embed, c.vocab_size * c.hidden_size);
  add("lm_head", w.lm_head, c.vocab_size * c.hidden_size);
  add("final_norm", w.final_norm, c.hidden_size);
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LlamaLayerWeights& L = w.layers[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    add(p + "attn_norm", L.attn_norm, c.hidden_size);
    add(p + "mlp_norm", L.mlp_norm, c.hidden_size);
    for (const auto& [n, lw] : {std::pair<const char*, const ops::LinearWeight*>{"q", &L.q},
                                {"k", &L.k},
                                {"v", &L.v},
                                {"o", &L.o},
                                {"gate", &L.gate},
                                {"up", &L.up},
                                {"down", &L.down}})
      add(p + n, lw->dense, lw->out * lw->in);
  }
  return out;
}

WeightLoadOptions dense() {
  WeightLoadOptions o;
  o.quantize = false;
  return o;
}

MergeOptions gguf_opt(const char* dtype) {
  MergeOptions o;
  o.format = MergeFormat::Gguf;
  set_merge_dtype(o, dtype);
  return o;
}

MergeOptions hf_opt(const char* dtype) {
  MergeOptions o;
  set_merge_dtype(o, dtype);
  return o;
}

TEST(GgufExport, MergedGgufEqualsTheHfMergeInEveryDtype) {
  Fixture fx;
  for (const char* dt : {"f32", "f16", "bf16"}) {
    SCOPED_TRACE(dt);
    const fs::path g = fx.dir / (std::string("m-") + dt + ".gguf"), h = fx.dir / (std::string("m-") + dt);
    const MergeReport r = merge_model(fx.dir / "base", fx.dir / "adapter", g, gguf_opt(dt));
    EXPECT_EQ(r.merged_tensors, kNumLoraTargets * fx.cfg.num_hidden_layers);
    EXPECT_TRUE(r.q8_0_fallbacks.empty());
    merge_model(fx.dir / "base", fx.dir / "adapter", h, hf_opt(dt));
    // W' is computed once in fp32 and rounded once to the dtype in both, so the
    // GGUF (read back through qlora's GGUF loader, q/k rows restored) equals
    // the HF folder exactly; norms (1.0 in builtin:tiny) are F32 in the GGUF.
    const auto a = dense_tensors(load_llama_weights(g, dense())),
               b = dense_tensors(load_llama_weights(h, dense()));
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].second, b[i].second) << a[i].first;
  }
  // A GGUF base (q/k rows read back to HF order, then interleaved again; its
  // tokenizer keys copied) gives what the same base as an HF folder gives.
  merge_model(fx.dir / "m-f32.gguf", fx.dir / "adapter", fx.dir / "twice.gguf", gguf_opt("f32"));
  merge_model(fx.dir / "m-f32", fx.dir / "adapter", fx.dir / "twice", hf_opt("f32"));
  {
    const auto a = dense_tensors(load_llama_weights(fx.dir / "twice.gguf", dense()));
    const auto b = dense_tensors(load_llama_weights(fx.dir / "twice", dense()));
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i].second, b[i].second) << "twice: " << a[i].first;
    const GgufFile g1(fx.dir / "m-f32.gguf"), g2(fx.dir / "twice.gguf");
    EXPECT_EQ(g2.get_string_array("tokenizer.ggml.merges"), g1.get_string_array("tokenizer.ggml.merges"));
    EXPECT_EQ(g2.get_string_array("tokenizer.ggml.tokens"), g1.get_string_array("tokenizer.ggml.tokens"));
  }
  // The metadata: what llama.cpp needs, and the base's configuration back.
  const GgufFile f(fx.dir / "m-bf16.gguf");
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("general.alignment"), 32);
  EXPECT_EQ(f.get_int("general.file_type"), 32);  // MOSTLY_BF16
  EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f.get_string("tokenizer.ggml.pre"), "gpt-2");
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.tokens").size(), size_t(fx.cfg.vocab_size));
  EXPECT_EQ(f.find_tensor("blk.0.attn_norm.weight")->type, GgmlType::F32);
  EXPECT_EQ(f.find_tensor("blk.0.attn_q.weight")->type, GgmlType::BF16);
  EXPECT_EQ(f.find_tensor("blk.0.attn_q.weight")->ne,
            (std::vector<int64_t>{fx.cfg.hidden_size, fx.cfg.q_dim()}));
  EXPECT_EQ(f.find_tensor("output.weight")->ne,
            (std::vector<int64_t>{fx.cfg.hidden_size, fx.cfg.vocab_size}));
  const ModelConfig back = load_model_config(fx.dir / "m-bf16.gguf");
  EXPECT_EQ(back.bos_token_ids, fx.cfg.bos_token_ids);
  EXPECT_EQ(back.eos_token_ids, fx.cfg.eos_token_ids);
  EXPECT_EQ(back.num_key_value_heads, fx.cfg.num_key_value_heads);
  EXPECT_EQ(back.head_dim, fx.cfg.head_dim);
}

// Q8_0 against the f32 merge: per block of 32, d = amax / 127 stored as fp16,
// so each value is off by at most half a step, d/2, plus what d's fp16
// rounding (2^-11 relative) moves the largest code (127).
void expect_q8_0_close(const std::vector<float>& got, const std::vector<float>& want,
                       const std::string& name) {
  ASSERT_EQ(got.size(), want.size()) << name;
  for (size_t b = 0; b < want.size(); b += 32) {
    float amax = 0;
    for (size_t i = b; i < b + 32; ++i) amax = std::max(amax, std::fabs(want[i]));
    const double d = amax / 127.0, tol = d * (0.5 + 127 * 0x1p-11) * (1 + 1e-6) + 1e-30;
    for (size_t i = b; i < b + 32; ++i)
      ASSERT_LE(std::fabs(double(got[i]) - want[i]), tol) << name << "[" << i << "]";
  }
}

TEST(GgufExport, Q8_0MergeIsWithinItsBoundAndFallsBackToF16ForShortRows) {
  Fixture fx;
  merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "q8.gguf", gguf_opt("q8_0"));
  merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "f32", hf_opt("f32"));
  EXPECT_EQ(GgufFile(fx.dir / "q8.gguf").get_int("general.file_type"), 7);
  const auto a = dense_tensors(load_llama_weights(fx.dir / "q8.gguf", dense()));
  const auto b = dense_tensors(load_llama_weights(fx.dir / "f32", dense()));
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].first.find("norm") != std::string::npos)
      EXPECT_EQ(a[i].second, b[i].second) << a[i].first << " (F32)";
    else
      expect_q8_0_close(a[i].second, b[i].second, a[i].first);
  }

  // A model whose down_proj rows hold 48 values (not a whole number of 32-value
  // blocks): that weight is F16, named in the report; the rest Q8_0.
  ScratchDir d;
  ModelConfig cfg = testing::tiny_gqa_config(2);
  cfg.vocab_size = fx.cfg.vocab_size;  // builtin:tiny's tokenizer fits
  const nlohmann::json cj = {{"architectures", {"LlamaForCausalLM"}},
                             {"model_type", "llama"},
                             {"vocab_size", cfg.vocab_size},
                             {"hidden_size", cfg.hidden_size},
                             {"intermediate_size", cfg.intermediate_size},
                             {"num_hidden_layers", cfg.num_hidden_layers},
                             {"num_attention_heads", cfg.num_attention_heads},
                             {"num_key_value_heads", cfg.num_key_value_heads},
                             {"head_dim", cfg.head_dim},
                             {"max_position_embeddings", cfg.max_position_embeddings},
                             {"rms_norm_eps", 1e-5},
                             {"bos_token_id", 1},
                             {"eos_token_id", 2},
                             {"tie_word_embeddings", false}};
  fs::create_directories(d / "small");
  testing::write_bytes(d / "small" / "config.json", cj.dump());
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(fx.dir / "base" / f, d / "small" / f);
  const ModelConfig small = load_model_config(d / "small");
  std::vector<OwnedTensor> ts;
  unsigned seed = 100;
  for (const TensorSlot& s : expected_tensors(small)) {
    const auto v = testing::randn(shape_numel(s.shape), seed++, 0.02f);
    OwnedTensor t{s.name, DType::F32, s.shape, std::vector<uint8_t>(v.size() * 4)};
    std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
    ts.push_back(std::move(t));
  }
  save_safetensors(d / "small" / "model.safetensors", ts);
  save_peft_adapter(random_lora(small, all_targets(2, 4.0, false), 5, 0.05f), small, d / "ad", "x");
  const MergeReport r = merge_model(d / "small", d / "ad", d / "s.gguf", gguf_opt("q8_0"));
  EXPECT_EQ(r.q8_0_fallbacks, (std::vector<std::string>{"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}));
  const GgufFile f(d / "s.gguf");
  EXPECT_EQ(f.find_tensor("blk.0.ffn_down.weight")->type, GgmlType::F16);
  EXPECT_EQ(f.find_tensor("blk.0.ffn_up.weight")->type, GgmlType::Q8_0);
  EXPECT_EQ(f.find_tensor("blk.0.attn_q.weight")->type, GgmlType::Q8_0);
  merge_model(d / "small", d / "ad", d / "s32", hf_opt("f32"));
  const auto x = dense_tensors(load_llama_weights(d / "s.gguf", dense()));
  const auto y = dense_tensors(load_llama_weights(d / "s32", dense()));
  for (size_t i = 0; i < x.size(); ++i) {
    if (x[i].first.find("down") != std::string::npos) {
      for (size_t k = 0; k < x[i].second.size(); ++k)
        ASSERT_LE(std::fabs(x[i].second[k] - y[i].second[k]), 0x1p-11 * std::fabs(y[i].second[k]) + 0x1p-25)
            << x[i].first << "[" << k << "] (F16)";
    } else if (x[i].first.find("norm") == std::string::npos) {
      expect_q8_0_close(x[i].second, y[i].second, x[i].first);
    }
  }
}

TEST(GgufExport, MergeRefusalsLeaveNothing) {
  Fixture fx;
  // An adapter for another base, an existing file, a folder as output, an unwritable place.
  ModelConfig other = fx.cfg;
  other.num_hidden_layers = 2;
  save_peft_adapter(random_lora(other, all_targets(4, 8.0, false), 3, 0.05f), other, fx.dir / "shallow", "x");
  std::string e = testing::error_of(
      [&] { merge_model(fx.dir / "base", fx.dir / "shallow", fx.dir / "a.gguf", gguf_opt("f16")); });
  EXPECT_NE(e.find("layers.2."), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(fx.dir / "a.gguf"));
  testing::write_bytes(fx.dir / "b.gguf", "keep");
  e = testing::error_of(
      [&] { merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "b.gguf", gguf_opt("f16")); });
  EXPECT_NE(e.find("--overwrite"), std::string::npos) << e;
  EXPECT_EQ(testing::read_bytes(fx.dir / "b.gguf"), "keep");
  MergeOptions ow = gguf_opt("f16");
  ow.overwrite = true;
  e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "adapter", ow); });
  EXPECT_NE(e.find("must differ"), std::string::npos) << e;
  fs::create_directories(fx.dir / "folder");
  e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "folder", ow); });
  EXPECT_NE(e.find("one file"), std::string::npos) << e;
  {
    testing::FileSizeLimit limit(64 << 10);
    e = testing::error_of([&] { merge_model(fx.dir / "base", fx.dir / "adapter", fx.dir / "c.gguf", ow); });
  }
  EXPECT_FALSE(e.empty());
  EXPECT_FALSE(fs::exists(fx.dir / "c.gguf"));
  // A tokenizer llama.cpp's GGUF cannot describe: refused before the file is opened.
  fs::copy(fx.dir / "base", fx.dir / "odd");
  nlohmann::json tj = nlohmann::json::parse(testing::read_bytes(fx.dir / "odd" / "tokenizer.json"));
  tj["pre_tokenizer"] = {{"type", "Sequence"},
                         {"pretokenizers",
                          {{{"type", "Punctuation"}},
                           {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}}}};
  testing::write_bytes(fx.dir / "odd" / "tokenizer.json", tj.dump());
  e = testing::error_of([&] { merge_model(fx.dir / "odd", fx.dir / "adapter", fx.dir / "d.gguf", ow); });
  EXPECT_NE(e.find("pre-tokenizer"), std::string::npos) << e;
  EXPECT_NE(e.find("smollm"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(fx.dir / "d.gguf"));
  for (const auto& entry : fs::directory_iterator(fx.dir.path()))
    EXPECT_EQ(entry.path().string().find(".tmp-"), std::string::npos) << entry.path();
}

// ---- metadata round trips ----

// The GGUF of a configuration: its metadata and the tensors whose presence or
// shape gguf_config_json reads (embeddings, lm_head, biases, rope_freqs), zeros.
void write_config_gguf(const fs::path& p, const ModelConfig& cfg) {
  GgufWriter w(p);
  for (const auto& [k, v] : gguf_model_metadata(cfg)) w.add(k, v);
  const std::vector<float> freqs = gguf_rope_freqs(cfg);
  if (!freqs.empty()) w.add_tensor(kGgufRopeFreqsTensor, {int64_t(freqs.size())}, GgmlType::F32);
  w.add_tensor("token_embd.weight", {cfg.hidden_size, cfg.vocab_size}, GgmlType::F32);
  if (!cfg.tie_word_embeddings)
    w.add_tensor("output.weight", {cfg.hidden_size, cfg.vocab_size}, GgmlType::F32);
  if (cfg.attention_bias) w.add_tensor("blk.0.attn_q.bias", {cfg.q_dim()}, GgmlType::F32);
  if (cfg.mlp_bias) w.add_tensor("blk.0.ffn_gate.bias", {cfg.intermediate_size}, GgmlType::F32);
  if (!freqs.empty()) w.write(freqs.data(), freqs.size() * 4);
  uint64_t rest = 0;
  for (const auto& t : w.tensors())
    if (t.name != kGgufRopeFreqsTensor) rest += t.nbytes;
  w.write(std::vector<uint8_t>(rest));
  w.commit();
}

TEST(GgufExport, ConfigRoundTripsThroughTheMetadata) {
  ScratchDir d;
  const nlohmann::json base = {{"architectures", {"LlamaForCausalLM"}},
                               {"model_type", "llama"},
                               {"vocab_size", 64},
                               {"hidden_size", 64},
                               {"intermediate_size", 96},
                               {"num_hidden_layers", 2},
                               {"num_attention_heads", 4},
                               {"num_key_value_heads", 2},
                               {"max_position_embeddings", 2048},
                               {"rms_norm_eps", 1e-5},
                               {"rope_theta", 10000.0},
                               {"tie_word_embeddings", false}};
  std::vector<std::pair<std::string, nlohmann::json>> cases;
  cases.emplace_back("plain", base);
  nlohmann::json llama31 = base;  // Llama 3.1's RoPE scaling, and heads wider than hidden / heads
  llama31["rope_theta"] = 500000.0;
  llama31["head_dim"] = 32;
  llama31["max_position_embeddings"] = 131072;
  llama31["rope_scaling"] = {{"rope_type", "llama3"},
                             {"factor", 8.0},
                             {"low_freq_factor", 1.0},
                             {"high_freq_factor", 4.0},
                             {"original_max_position_embeddings", 8192}};
  cases.emplace_back("llama3 scaling", llama31);
  nlohmann::json linear = base;
  linear["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  linear["tie_word_embeddings"] = true;
  linear["attention_bias"] = true;
  linear["mlp_bias"] = true;
  cases.emplace_back("linear scaling, tied, biases", linear);
  nlohmann::json qwen = base;
  qwen["architectures"] = {"Qwen2ForCausalLM"};
  qwen["model_type"] = "qwen2";
  qwen["rms_norm_eps"] = 1e-6;
  qwen["rope_theta"] = 1000000.0;
  qwen["tie_word_embeddings"] = true;
  cases.emplace_back("qwen2", qwen);
  nlohmann::json mistral = base;
  mistral["architectures"] = {"MistralForCausalLM"};
  mistral["model_type"] = "mistral";
  mistral["sliding_window"] = nullptr;
  cases.emplace_back("mistral", mistral);
  nlohmann::json qwen3 = qwen;  // llama.cpp's "qwen3": q/k norms, head_dim != hidden / heads
  qwen3["architectures"] = {"Qwen3ForCausalLM"};
  qwen3["model_type"] = "qwen3";
  qwen3["head_dim"] = 32;
  cases.emplace_back("qwen3", qwen3);

  int n = 0;
  for (const auto& [name, j] : cases) {
    SCOPED_TRACE(name);
    const ModelConfig a = parse_model_config(j, name);
    const fs::path p = d / (std::to_string(n++) + ".gguf");
    write_config_gguf(p, a);
    const ModelConfig b = gguf_model_config(GgufFile(p));
    // llama.cpp runs Mistral as "llama"; the configuration is otherwise the same.
    EXPECT_EQ(b.arch, a.arch == Arch::Mistral ? Arch::Llama : a.arch);
    EXPECT_EQ(b.vocab_size, a.vocab_size);
    EXPECT_EQ(b.hidden_size, a.hidden_size);
    EXPECT_EQ(b.intermediate_size, a.intermediate_size);
    EXPECT_EQ(b.num_hidden_layers, a.num_hidden_layers);
    EXPECT_EQ(b.num_attention_heads, a.num_attention_heads);
    EXPECT_EQ(b.num_key_value_heads, a.num_key_value_heads);
    EXPECT_EQ(b.head_dim, a.head_dim);
    EXPECT_EQ(b.max_position_embeddings, a.max_position_embeddings);
    EXPECT_EQ(b.rms_norm_eps, a.rms_norm_eps);
    EXPECT_EQ(b.rope_theta, a.rope_theta);
    EXPECT_EQ(b.rope_scaling.type, a.rope_scaling.type);
    EXPECT_EQ(b.rope_scaling.factor, a.rope_scaling.factor);
    if (a.rope_scaling.type == RopeScalingType::Llama3) {
      EXPECT_EQ(b.rope_scaling.low_freq_factor, a.rope_scaling.low_freq_factor);
      EXPECT_EQ(b.rope_scaling.high_freq_factor, a.rope_scaling.high_freq_factor);
      EXPECT_EQ(b.rope_scaling.original_max_position_embeddings,
                a.rope_scaling.original_max_position_embeddings);
    }
    EXPECT_EQ(b.tie_word_embeddings, a.tie_word_embeddings);
    EXPECT_EQ(b.attention_bias, a.attention_bias);
    EXPECT_EQ(b.mlp_bias, a.mlp_bias);
    EXPECT_EQ(b.qk_norm, a.qk_norm);
  }
}

// Sample texts: llama.cpp's tokenizer test inputs (whitespace runs, digits,
// code, CJK, emoji) and the first alpaca instructions, when the fixtures have them.
std::vector<std::string> sample_texts(const fs::path& fx) {
  std::vector<std::string> out = {"Hello world",
                                  " Hello World!",
                                  "3.14159 and 1234567 apples\n\n\tTabs",
                                  "<s>special</s> in text",
                                  "<|im_start|>user\nHi<|im_end|>",
                                  "naïve café 東京 🦙"};
  const std::string inp =
      testing::read_bytes(fx / "tokenizer_tests" / "llamacpp" / "ggml-vocab-llama-bpe.gguf.inp");
  const std::string sep = "\n__ggml_vocab_test__\n";
  for (size_t p = 0, q; (q = inp.find(sep, p)) != std::string::npos; p = q + sep.size())
    out.push_back(inp.substr(p, q - p));
  const auto alpaca =
      nlohmann::json::parse(testing::read_bytes(fx / "datasets" / "alpaca" / "alpaca_data_first102.json"));
  for (size_t i = 0; i < std::min<size_t>(alpaca.size(), 40); ++i)
    out.push_back(alpaca[i].value("instruction", "") + "\n" + alpaca[i].value("output", ""));
  return out;
}

// tokenizer files -> tokenizer.* keys -> a GGUF -> our GGUF tokenizer: the same ids.
// `reference`: the tokenizer file that is converted (default: the folder, as Tokenizer::load picks).
void expect_same_ids(const fs::path& dir, const fs::path& scratch, const std::vector<std::string>& texts,
                     const std::string& want_model, const std::string& want_pre,
                     const fs::path& reference = {}) {
  SCOPED_TRACE(dir.string());
  ModelConfig cfg;  // vocab_size 0: the tokenizer's own size; ids from the tokenizer files
  const GgufKeyValues kv = gguf_tokenizer_metadata(dir, cfg);
  {
    GgufWriter w(scratch);
    w.add_string("general.architecture", "llama");
    for (const auto& [k, v] : kv) w.add(k, v);
    w.commit();
  }
  const GgufFile f(scratch);
  EXPECT_EQ(f.get_string("tokenizer.ggml.model"), want_model);
  EXPECT_EQ(f.get_string("tokenizer.ggml.pre"), want_pre);
  const auto hf = Tokenizer::load(reference.empty() ? dir : reference);
  const auto gg = load_gguf_tokenizer(f);
  EXPECT_EQ(gg->bos_id(), hf->bos_id());
  EXPECT_EQ(gg->eos_id(), hf->eos_id());
  EXPECT_EQ(gg->chat_template(), hf->chat_template());
  for (const std::string& t : texts)
    for (bool special : {false, true})
      ASSERT_EQ(gg->encode(t, special), hf->encode(t, special))
          << "text: \"" << t << "\" add_special " << special;
}

TEST(GgufExport, TokenizersRoundTripThroughTheMetadata) {
  ScratchDir d;
  write_builtin_model("tiny", d / "tiny");
  QLORA_REQUIRE_FIXTURES(fx);
  const std::vector<std::string> texts = sample_texts(fx);
  expect_same_ids(d / "tiny", d / "tiny.gguf", texts, "gpt2", "gpt-2");
  const fs::path tk = fx / "tokenizers";
  expect_same_ids(tk / "smollm-135m-instruct", d / "smollm.gguf", texts, "gpt2", "smollm");
  expect_same_ids(tk / "llama3" / "assembled_hf", d / "llama3.gguf", texts, "gpt2", "llama-bpe");
  // tokenizer.json here is SentencePiece-style (Metaspace): tokenizer.model is what is converted, and
  // the reference. (HF's tokenizer.json path differs from SentencePiece on special tokens written in
  // the text: it matches "<s>" but splits "</s>"; llama.cpp, like the SentencePiece path, matches both.)
  expect_same_ids(tk / "llama2-hf", d / "llama2.gguf", texts, "llama", "default",
                  tk / "llama2-hf" / "tokenizer.model");
}

// ---- end to end through the CLI ----

std::string ids_line(const std::string& out) {
  const size_t p = out.find("ids: ");
  return p == std::string::npos ? "" : out.substr(p, out.find('\n', p) - p);
}

TEST(GgufExport, CliExportMergeAndGenerateFromTheMergedGguf) {
  ScratchDir d;
  const std::string cache = "QLORA_CACHE='" + (d / "cache").string() + "'";
  const ModelConfig cfg = load_model_config(resolve_model_path("builtin:tiny"));
  // A strong adapter naming builtin:tiny as its base (as `qlora run` on the demo writes).
  save_peft_adapter(random_lora(cfg, all_targets(4, 8.0, false), 21, 0.2f), cfg, d / "ad", "builtin:tiny");
  const std::string ad = "'" + (d / "ad").string() + "'";

  auto r =
      run_qlora("export --adapter " + ad + " --format gguf -o '" + (d / "ad.gguf").string() + "'", cache);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("llama-cli"), std::string::npos) << r.output;
  EXPECT_EQ(GgufFile(d / "ad.gguf").get_string("general.type"), "adapter");

  r = run_qlora(
      "merge --model builtin:tiny --adapter " + ad + " -o '" + (d / "m.gguf").string() + "' --dtype f32",
      cache);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("GGUF"), std::string::npos) << r.output;
  const std::string gen = " --dense --prompt-ids 1,40,300,7 --max-new-tokens 12 --ignore-eos --device cpu";
  const auto merged = run_qlora("generate --model '" + (d / "m.gguf").string() + "'" + gen, cache);
  const auto adapted = run_qlora("generate --model builtin:tiny --adapter " + ad + gen, cache);
  const auto plain = run_qlora("generate --model builtin:tiny" + gen, cache);
  ASSERT_EQ(merged.status, 0) << merged.output;
  ASSERT_EQ(adapted.status, 0) << adapted.output;
  EXPECT_FALSE(ids_line(merged.output).empty()) << merged.output;
  EXPECT_EQ(ids_line(merged.output), ids_line(adapted.output));
  EXPECT_NE(ids_line(plain.output), ids_line(adapted.output)) << "the adapter should change the output";

  // Bad arguments: usage errors, nothing written.
  r = run_qlora("export --adapter " + ad + " --format onnx -o '" + (d / "x.gguf").string() + "'", cache);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("onnx"), std::string::npos) << r.output;
  r = run_qlora(
      "merge --model builtin:tiny --adapter " + ad + " -o '" + (d / "y.gguf").string() + "' --dtype q4_0",
      cache);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("q4_0"), std::string::npos) << r.output;
  r = run_qlora("export --adapter " + ad + " --dtype q8_0 -o '" + (d / "z.gguf").string() + "'", cache);
  EXPECT_NE(r.status, 0);
  for (const char* f : {"x.gguf", "y.gguf", "z.gguf"}) EXPECT_FALSE(fs::exists(d / f)) << f;
}

TEST(GgufExport, RunWritesAdapterGgufWhenTheRecipeAsks) {
  ScratchDir d;
  const fs::path demo = fs::path(QLORA_SOURCE_DIR) / "recipes" / "demo.yaml";
  const Recipe r = load_recipe(demo, {"train.max_steps=1", "output.gguf=true", "data.cache=false",
                                      "output.dir=" + (d / "run").string()});
  EXPECT_TRUE(r.output.gguf);
  std::FILE* log = std::tmpfile();
  RunOptions o;
  o.out = log;
  o.live = false;
  o.samples = false;
  const RunSummary s = run_recipe(r, o);
  std::fclose(log);
  // The export of the run's own adapter, beside it.
  const GgufFile f(d / "run" / "adapter.gguf");
  EXPECT_EQ(f.get_string("general.type"), "adapter");
  EXPECT_EQ(f.get_float("adapter.lora.alpha"), r.lora.alpha);
  const ModelConfig cfg = load_model_config(resolve_model_path(r.model.path));
  const LoraWeights peft = LoraWeights::load_peft(s.adapter_dir, cfg);
  const std::vector<float> a = tensor_f32(f, "blk.2.ffn_down.weight.lora_a");
  const auto [in, out] = lora_target_dims(cfg, LoraTarget::Down);
  (void)out;
  ASSERT_EQ(a.size(), size_t(r.lora.rank * in));
  EXPECT_TRUE(std::equal(a.begin(), a.end(), peft.A(2, LoraTarget::Down)));
}

}  // namespace
}  // namespace qlora
