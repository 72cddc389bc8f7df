// A GGUF file as a model: the real SmolLM2-135M-Instruct (the fixture's Q4_1
// GGUF) against reference outputs made by transformers from gguf-py's
// dequantization of the same file (expected_greedy.json, see the fixtures
// README): configuration, tokenizer, chat template, greedy continuations and
// next-token logits. Plus the q/k row order and the GGUF -> HF conversion.
#include <gtest/gtest.h>
#include <sentencepiece_processor.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <span>

#include "data/tokenize_sample.h"
#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "io/hf_config.h"
#include "model/gguf_names.h"
#include "model/llama_generate.h"
#include "model/weights.h"
#include "quant/blockwise.h"
#include "testing.h"
#include "tokenizer/tokenizer.h"
#include "tools/quantize_model.h"
#include "train/sample_text.h"

namespace qlora {
namespace {

using testing::fixtures_dir;

std::filesystem::path smollm_dir(const std::filesystem::path& fixtures) {
  return fixtures / "models/smollm2-135m-instruct";
}
std::filesystem::path smollm_gguf(const std::filesystem::path& fixtures) {
  return smollm_dir(fixtures) / "SmolLM2-135M-Instruct.Q4_1.gguf";
}

nlohmann::json expected_greedy(const std::filesystem::path& fixtures) {
  std::ifstream f(smollm_dir(fixtures) / "expected_greedy.json");
  EXPECT_TRUE(f) << "missing expected_greedy.json in " << smollm_dir(fixtures);
  return nlohmann::json::parse(f);
}

// Greedy ids after `prompt`, and the logits before the first of them.
std::vector<int32_t> greedy(const LlamaWeights& w, const std::vector<int32_t>& prompt, int64_t steps,
                            std::vector<float>* first_logits = nullptr) {
  LlamaGenerator gen(w, nullptr, int64_t(prompt.size()) + steps);
  std::vector<float> logits(size_t(w.cfg.vocab_size));
  gen.feed(prompt.data(), int64_t(prompt.size()), logits.data());
  if (first_logits) *first_logits = logits;
  std::mt19937_64 rng(0);
  std::vector<int32_t> out;
  for (int64_t s = 0; s < steps; ++s) {
    const int32_t id = sample_token(logits.data(), w.cfg.vocab_size, {}, rng);
    out.push_back(id);
    if (s + 1 < steps) gen.feed(&id, 1, logits.data());
  }
  return out;
}

TEST(GgufModel, SmolLM2ConfigFromMetadata) {
  QLORA_REQUIRE_FIXTURES(fx);
  const ModelConfig c = load_model_config(smollm_gguf(fx));
  EXPECT_EQ(c.arch, Arch::Llama);
  EXPECT_EQ(c.num_hidden_layers, 30);
  EXPECT_EQ(c.hidden_size, 576);
  EXPECT_EQ(c.intermediate_size, 1536);
  EXPECT_EQ(c.num_attention_heads, 9);
  EXPECT_EQ(c.num_key_value_heads, 3);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_EQ(c.max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(c.rope_theta, 100000.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);  // the short decimal of the file's f32
  EXPECT_TRUE(c.tie_word_embeddings);      // no output.weight in the file
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::None);
  EXPECT_EQ(c.bos_token_ids, std::vector<int64_t>{1});
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
}

// The tokenizer built from tokenizer.ggml.* gives the ids of the model's own
// tokenizer.json on real text: every record of three fixture datasets.
TEST(GgufModel, SmolLM2TokenizerEqualsTokenizerJson) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto from_gguf = Tokenizer::load(smollm_gguf(fx));
  const auto reference = Tokenizer::load(fx / "tokenizers/smollm-135m-instruct");
  EXPECT_EQ(from_gguf->vocab_size(), reference->vocab_size());
  EXPECT_EQ(from_gguf->bos_id(), reference->bos_id());
  EXPECT_EQ(from_gguf->eos_id(), reference->eos_id());
  size_t texts = 0;
  for (const char* file : {"medical/medalpaca_medical_meadow_small.json", "alpaca/alpaca_data_first102.json",
                           "legal/lawyer-llama/legal_advice.json"}) {
    std::ifstream in(fx / "datasets" / file);
    ASSERT_TRUE(in) << file;
    const auto j = nlohmann::json::parse(in);
    for (const auto& rec : j) {
      for (const auto& [key, v] : rec.items()) {
        if (!v.is_string()) continue;
        const std::string text = v.get<std::string>();
        ASSERT_EQ(from_gguf->encode(text, true), reference->encode(text, true))
            << file << " " << key << ": " << text;
        ++texts;
      }
      if (texts > 3000) break;
    }
  }
  EXPECT_GE(texts, 2000u);
  for (const std::string s :
       {"<|im_start|>user\nHi<|im_end|>\n", "  12345 digits\t\ttabs ünïcødé 東京 🙂"})
    EXPECT_EQ(from_gguf->encode(s, false), reference->encode(s, false)) << s;
}

// Dense (fp32 base, no NF4): the chat prompt ids (our template rendering and
// tokenizer), the 24 greedy ids and the next-token top-5 logits of every case.
TEST(GgufModel, SmolLM2DenseReproducesTransformers) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto ref = expected_greedy(fx);
  const auto tok = Tokenizer::load(smollm_gguf(fx));
  const ChatTemplate tmpl = template_for_tokenizer(*tok, "auto");
  EXPECT_EQ(tmpl.kind(), ChatTemplate::Kind::smollm2);
  WeightLoadOptions dense;
  dense.quantize = false;
  const LlamaWeights w = load_llama_weights(smollm_gguf(fx), dense);
  for (const auto& c : ref.at("cases")) {
    const std::string user = c.at("user");
    const auto want_prompt = c.at("prompt_ids").get<std::vector<int32_t>>();
    const auto prompt = chat_prompt_ids(*tok, tmpl, user);
    ASSERT_EQ(prompt, want_prompt) << user;
    const auto want = c.at("greedy_24").get<std::vector<int32_t>>();
    std::vector<float> logits;
    const auto got = greedy(w, prompt, int64_t(want.size()), &logits);
    EXPECT_EQ(got, want) << user << "\n got: " << tok->decode(got) << "\nwant: " << tok->decode(want);
    const auto ids = c.at("next_token_top5").at("ids").get<std::vector<int32_t>>();
    const auto top = c.at("next_token_top5").at("logits").get<std::vector<float>>();
    for (size_t k = 0; k < ids.size(); ++k)
      EXPECT_NEAR(logits[size_t(ids[k])], top[k], 1e-3) << user << " top-" << k << " id " << ids[k];
  }
}

// NF4 (quantized on load from the dequantized Q4_1 weights, block 64, double
// quant) rounds every block linear a second time. Its bound, derived rather
// than tuned: NF4's rounding error behaves like noise of its own size, so the
// NF4 model's logits may differ from the dense model's by at most twice as
// much as those of the dense model with every block linear perturbed by
// Gaussian noise of the same RMS as that tensor's NF4 error (the "twice a
// straightforward same-precision implementation" rule of flash-attention's
// tests). A wrong scale, block order or row order would be far outside it.
TEST(GgufModel, SmolLM2Nf4StaysNearDense) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto ref = expected_greedy(fx);
  WeightLoadOptions dense_opt;
  dense_opt.quantize = false;
  const LlamaWeights dense = load_llama_weights(smollm_gguf(fx), dense_opt);
  const LlamaWeights nf4 = load_llama_weights(smollm_gguf(fx));
  LlamaWeights noisy = load_llama_weights(smollm_gguf(fx), dense_opt);
  std::mt19937 rng(7);
  for (auto& L : noisy.layers)
    for (ops::LinearWeight* lw : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) {
      float* w = const_cast<float*>(lw->dense);  // the test's own copy of the weights
      const int64_t n = lw->out * lw->in;
      const Quant4Tensor q = quantize_tensor(w, {lw->out, lw->in}, Quant4Type::NF4, 64, true);
      std::vector<float> back(static_cast<size_t>(n));
      dequantize_tensor(q, back.data());
      double err2 = 0;
      for (int64_t i = 0; i < n; ++i) err2 += double(back[size_t(i)] - w[i]) * (back[size_t(i)] - w[i]);
      std::normal_distribution<float> noise(0.0f, float(std::sqrt(err2 / double(n))));
      for (int64_t i = 0; i < n; ++i) w[i] += noise(rng);
    }
  for (const auto& c : ref.at("cases")) {
    const auto prompt = c.at("prompt_ids").get<std::vector<int32_t>>();
    std::vector<float> ld, lq, ln;
    greedy(dense, prompt, 1, &ld);
    const auto first = greedy(nf4, prompt, 1, &lq);
    greedy(noisy, prompt, 1, &ln);
    const double err_nf4 = testing::rel_l2(ld, lq), err_noise = testing::rel_l2(ld, ln);
    std::printf(
        "[ info ] %s: logits rel. L2 error NF4 %.4f, same-size noise %.4f; NF4 first token %d (dense %d)\n",
        c.at("user").get<std::string>().c_str(), err_nf4, err_noise, first[0],
        c.at("greedy_24")[0].get<int32_t>());
    EXPECT_LE(err_nf4, 2 * err_noise) << c.at("user");
  }
}

// `qlora quantize model.gguf --type none` writes a plain BF16 HF folder that
// loads back with the same logits as the GGUF (within BF16 rounding of the weights).
TEST(GgufModel, SmolLM2ConvertsToHfFolder) {
  QLORA_REQUIRE_FIXTURES(fx);
  testing::ScratchDir tmp;
  QuantizeOptions opt;
  opt.quantize = false;
  opt.device = QuantDevice::cpu;
  quantize_model(smollm_gguf(fx), tmp / "hf", opt);
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                        "generation_config.json"})
    EXPECT_TRUE(std::filesystem::exists(tmp / "hf" / f)) << f;
  EXPECT_EQ(load_model_config(tmp / "hf").num_hidden_layers, 30);
  const auto tok = Tokenizer::load(tmp / "hf");
  EXPECT_TRUE(tok->chat_template().has_value());
  const auto ref = expected_greedy(fx);
  const auto prompt = ref.at("cases")[0].at("prompt_ids").get<std::vector<int32_t>>();
  WeightLoadOptions dense;
  dense.quantize = false;
  std::vector<float> lg, lh;
  greedy(load_llama_weights(smollm_gguf(fx), dense), prompt, 1, &lg);
  greedy(load_llama_weights(tmp / "hf", dense), prompt, 1, &lh);
  // BF16 keeps 8 bits of mantissa: each weight moves by at most 2^-9 relative.
  EXPECT_LT(testing::rel_l2(lg, lh), 0.02);
  EXPECT_EQ(tok->encode("Hello world", true), Tokenizer::load(smollm_gguf(fx))->encode("Hello world", true));
}

// A "llama" (SentencePiece) vocabulary as llama.cpp's converter writes it:
// pieces, scores and types of Llama 2's tokenizer.model. The tokenizer qlora
// builds from those keys encodes as the original model does.
TEST(GgufModel, SentencePieceVocabularyEncodesAsTheModel) {
  QLORA_REQUIRE_FIXTURES(fx);
  const auto model = fx / "tokenizers/llama2-hf/tokenizer.model";
  sentencepiece::SentencePieceProcessor sp;
  ASSERT_TRUE(sp.Load(model.string()).ok());
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int64_t> types;
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    tokens.push_back(sp.IdToPiece(id));
    scores.push_back(sp.GetScore(id));
    types.push_back(sp.IsUnknown(id)   ? 2
                    : sp.IsControl(id) ? 3
                    : sp.IsUnused(id)  ? 5
                    : sp.IsByte(id)    ? 6
                                       : 1);
  }
  testing::ScratchDir tmp;
  const auto file = tmp / "vocab.gguf";
  {
    GgufWriter w(file);
    w.add_string("general.architecture", "llama");
    w.add_string("tokenizer.ggml.model", "llama");
    w.add_string_array("tokenizer.ggml.tokens", tokens);
    w.add_float_array("tokenizer.ggml.scores", std::span<const float>(scores));
    w.add_int_array("tokenizer.ggml.token_type", types);
    w.add_u32("tokenizer.ggml.bos_token_id", 1);
    w.add_u32("tokenizer.ggml.eos_token_id", 2);
    w.add_u32("tokenizer.ggml.unknown_token_id", 0);
    w.add_bool("tokenizer.ggml.add_bos_token", true);
    w.commit();
  }
  const auto from_gguf = Tokenizer::load(file);
  const auto reference = Tokenizer::load(model);
  ASSERT_EQ(from_gguf->vocab_size(), reference->vocab_size());
  EXPECT_EQ(from_gguf->bos_id(), reference->bos_id());
  EXPECT_EQ(from_gguf->eos_id(), reference->eos_id());
  std::ifstream in(fx / "datasets/alpaca/alpaca_data_first102.json");
  const auto j = nlohmann::json::parse(in);
  size_t texts = 0;
  for (const auto& rec : j)
    for (const auto& [key, v] : rec.items())
      if (v.is_string()) {
        const std::string text = v.get<std::string>();
        ASSERT_EQ(from_gguf->encode(text, true), reference->encode(text, true)) << key << ": " << text;
        ++texts;
      }
  EXPECT_GT(texts, 200u);
  for (const std::string t :
       {" leading space", "tabs\tand\nnewlines", "ünïcødé 東京 🙂 <s> </s>", ""})
    EXPECT_EQ(from_gguf->encode(t, true), reference->encode(t, true)) << t;
}

// Bad GGUF models: messages name the file and the key or tensor, and what was expected.
TEST(GgufModel, BadModelsAreRefusedByName) {
  testing::ScratchDir tmp;
  const auto write = [&](const std::string& name, const std::function<void(GgufWriter&)>& fill) {
    const auto file = tmp / name;
    GgufWriter w(file);
    fill(w);
    w.commit();
    return file;
  };
  const auto arch = write("arch.gguf", [](GgufWriter& w) { w.add_string("general.architecture", "falcon"); });
  std::string e = testing::error_of([&] { load_model_config(arch); });
  EXPECT_NE(e.find("arch.gguf"), std::string::npos) << e;
  EXPECT_NE(e.find("\"falcon\" is not supported"), std::string::npos) << e;
  const auto keys = write("keys.gguf", [](GgufWriter& w) { w.add_string("general.architecture", "llama"); });
  e = testing::error_of([&] { load_model_config(keys); });
  EXPECT_NE(e.find("llama.embedding_length"), std::string::npos) << e;
  e = testing::error_of([&] { Tokenizer::load(keys); });
  EXPECT_NE(e.find("tokenizer.ggml.model"), std::string::npos) << e;
  const auto pre = write("pre.gguf", [](GgufWriter& w) {
    w.add_string("tokenizer.ggml.model", "gpt2");
    w.add_string("tokenizer.ggml.pre", "falcon");
    w.add_string_array("tokenizer.ggml.tokens", std::vector<std::string>{"a", "b"});
  });
  e = testing::error_of([&] { Tokenizer::load(pre); });
  EXPECT_NE(e.find("tokenizer.ggml.pre \"falcon\" is not supported"), std::string::npos) << e;
}

// Tensors that do not match the metadata, and types that cannot be read.
TEST(GgufModel, TensorsAreCheckedAgainstTheMetadata) {
  QLORA_REQUIRE_FIXTURES(fx);
  const GgufFile src(smollm_gguf(fx));
  testing::ScratchDir tmp;
  // The fixture's metadata with only its first tensor, then with its first
  // tensor's type claimed as IQ2_XXS (same byte size per 256 values: no).
  const auto file = tmp / "missing.gguf";
  {
    GgufWriter w(file);
    for (const auto& [k, v] : src.metadata()) w.add(k, v);
    const GgufTensorInfo& t = src.tensors().front();
    w.add_tensor(t.name, t.ne, t.type);
    const auto bytes = src.data(t);
    w.write(bytes.data(), bytes.size());
    w.commit();
  }
  const std::string e = testing::error_of([&] { load_llama_weights(file); });
  EXPECT_NE(e.find("missing.gguf"), std::string::npos) << e;
  EXPECT_NE(e.find("blk.0.attn_q.weight"), std::string::npos) << e;  // named by its llama.cpp name
}

// A tensor type qlora cannot dequantize (IQ4_NL here) is refused by name,
// with the supported list, before any value is read; nothing is written.
TEST(GgufModel, UnsupportedTensorTypeIsRefusedByName) {
  QLORA_REQUIRE_FIXTURES(fx);
  const GgufFile src(smollm_gguf(fx));
  testing::ScratchDir tmp;
  const auto file = tmp / "iq.gguf";
  {
    GgufWriter w(file);
    for (const auto& [k, v] : src.metadata()) w.add(k, v);
    for (const GgufTensorInfo& t : src.tensors())
      w.add_tensor(t.name, t.ne, t.name == "blk.0.attn_q.weight" ? GgmlType::IQ4_NL : t.type);
    for (const GgufTensorInfo& t : src.tensors()) {
      if (t.name == "blk.0.attn_q.weight") {
        const std::vector<uint8_t> zeros(size_t(*ggml_nbytes(GgmlType::IQ4_NL, t.numel())), 0);
        w.write(zeros.data(), zeros.size());
      } else {
        const auto bytes = src.data(t);
        w.write(bytes.data(), bytes.size());
      }
    }
    w.commit();
  }
  const std::string e = testing::error_of([&] { load_llama_weights(file); });
  EXPECT_NE(e.find("iq.gguf"), std::string::npos) << e;
  EXPECT_NE(e.find("blk.0.attn_q.weight has type IQ4_NL"), std::string::npos) << e;
  EXPECT_NE(e.find("supported: F32, F16, BF16, Q8_0"), std::string::npos) << e;
  const auto r = testing::run_qlora("quantize " + file.string() + " -o " + (tmp / "out").string());
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("IQ4_NL"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(tmp / "out"));
}

// The commands take the GGUF file wherever they take a model.
TEST(GgufModel, CommandsTakeTheGgufFile) {
  QLORA_REQUIRE_FIXTURES(fx);
  const std::string m = smollm_gguf(fx).string();
  auto r = testing::run_qlora("generate --model '" + m +
                              "' --chat --prompt 'What is the capital of France?' --dense --device cpu");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("The capital of France is Paris."), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("ids:"), std::string::npos) << "--chat prints the reply alone:\n" << r.output;
  r = testing::run_qlora("generate --model '" + m + "' --prompt-ids 1,9690,198 --max-new-tokens 2 --device cpu");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("ids: "), std::string::npos) << r.output;
  r = testing::run_qlora("inspect '" + m + "' --json");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("Q4_1 x210"), std::string::npos) << r.output;
  r = testing::run_qlora("estimate --model '" + m + "' --seq 256 --batch 2 --rank 16");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("verdict"), std::string::npos) << r.output;
  testing::ScratchDir tmp;
  testing::write_bytes(tmp / "qa.jsonl", "{\"instruction\": \"What is a lease?\", \"output\": \"A contract to rent.\"}\n");
  r = testing::run_qlora("eval --model '" + m + "' --data " + (tmp / "qa.jsonl").string() +
                         " --format alpaca --seq-len 128");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("template smollm2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("perplexity"), std::string::npos) << r.output;
}

TEST(GgufNames, QkRowsRoundTripAndMatchLlamaCppPermute) {
  // 2 heads of 4 rows, 3 columns: llama.cpp's converter stores row
  // h*D + 2*i + s what HF has at h*D + s*D/2 + i.
  const int64_t heads = 2, D = 4, cols = 3, rows = heads * D;
  std::vector<float> hf(size_t(rows * cols));
  for (size_t i = 0; i < hf.size(); ++i) hf[i] = float(i);
  std::vector<float> g = hf;
  qk_rows_to_gguf(g.data(), rows, cols, heads);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t s = 0; s < 2; ++s)
      for (int64_t i = 0; i < D / 2; ++i)
        for (int64_t c = 0; c < cols; ++c)
          EXPECT_EQ(g[size_t((h * D + 2 * i + s) * cols + c)],
                    hf[size_t((h * D + s * D / 2 + i) * cols + c)]);
  qk_rows_from_gguf(g.data(), rows, cols, heads);
  EXPECT_EQ(g, hf);
}

TEST(GgufNames, LlamaCppTensorNames) {
  EXPECT_EQ(gguf_module_name(TensorKind::Q, 3), "blk.3.attn_q");
  EXPECT_EQ(gguf_module_name(TensorKind::O, 0), "blk.0.attn_output");
  EXPECT_EQ(gguf_module_name(TensorKind::Down, 1), "blk.1.ffn_down");
  EXPECT_EQ(gguf_module_name(TensorKind::MlpNorm, 1), "blk.1.ffn_norm");
  EXPECT_EQ(gguf_module_name(TensorKind::Embed, -1), "token_embd");
  EXPECT_EQ(gguf_module_name(TensorKind::LmHead, -1), "output");
  EXPECT_EQ(gguf_module_name(TensorKind::FinalNorm, -1), "output_norm");
  EXPECT_EQ(gguf_module_name(TensorKind::QNorm, 2), "blk.2.attn_q_norm");  // llama.cpp's qwen3
  EXPECT_EQ(gguf_module_name(TensorKind::KNorm, 2), "blk.2.attn_k_norm");
}

}  // namespace
}  // namespace qlora
