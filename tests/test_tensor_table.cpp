// The expected tensor list of real model shapes, and the checker that compares
// a checkpoint's tensors with it.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>

#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/tensor_table.h"
#include "testing.h"

namespace qlora {
namespace {

ModelConfig llama2_7b() {
  ModelConfig c;
  c.arch = Arch::Llama;
  c.model_type = "llama";
  c.vocab_size = 32000;
  c.hidden_size = 4096;
  c.intermediate_size = 11008;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 32;
  c.head_dim = 128;
  c.tie_word_embeddings = false;
  return c;
}

ModelConfig qwen25_05b() {
  ModelConfig c;
  c.arch = Arch::Qwen2;
  c.model_type = "qwen2";
  c.vocab_size = 151936;
  c.hidden_size = 896;
  c.intermediate_size = 4864;
  c.num_hidden_layers = 24;
  c.num_attention_heads = 14;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.tie_word_embeddings = true;
  c.attention_bias = true;
  return c;
}

std::map<std::string, TensorSlot> by_name(const std::vector<TensorSlot>& slots) {
  std::map<std::string, TensorSlot> m;
  for (const TensorSlot& s : slots) m.emplace(s.name, s);
  return m;
}

std::vector<PresentTensor> as_present(const std::vector<TensorSlot>& slots) {
  std::vector<PresentTensor> out;
  for (const TensorSlot& s : slots) out.push_back({s.name, s.shape});
  return out;
}

// Qwen3: q_norm/k_norm [D] in every block; with attention_bias (false in the
// published models) biases on all four projections, as Qwen3Attention builds them.
TEST(TensorTable, Qwen3HasQkNormsAndLlamaStyleBiases) {
  ModelConfig c = qwen25_05b();
  c.arch = Arch::Qwen3;
  c.model_type = "qwen3";
  c.qk_norm = true;
  c.head_dim = 128;  // 14 heads x 128 = 1792 != hidden 896
  c.attention_bias = false;
  auto m = by_name(expected_tensors(c));
  EXPECT_EQ(m.size(), 1u + 1u + 11u * 24u);  // embed, final norm; per block 7 linears, 2 norms, q/k norms
  EXPECT_EQ(m.at("model.layers.3.self_attn.q_norm.weight").shape, Shape{128});
  EXPECT_EQ(m.at("model.layers.3.self_attn.k_norm.weight").kind, TensorKind::KNorm);
  EXPECT_EQ(m.at("model.layers.0.self_attn.q_proj.weight").shape, (Shape{1792, 896}));
  EXPECT_EQ(m.at("model.layers.0.self_attn.o_proj.weight").shape, (Shape{896, 1792}));
  EXPECT_EQ(m.count("model.layers.0.self_attn.q_proj.bias"), 0u);
  c.attention_bias = true;
  m = by_name(expected_tensors(c));
  EXPECT_EQ(m.count("model.layers.0.self_attn.q_proj.bias"), 1u);
  EXPECT_EQ(m.count("model.layers.0.self_attn.o_proj.bias"), 1u);
  // Qwen2 never has the o bias, and no q/k norms.
  m = by_name(expected_tensors(qwen25_05b()));
  EXPECT_EQ(m.count("model.layers.0.self_attn.o_proj.bias"), 0u);
  EXPECT_EQ(m.count("model.layers.0.self_attn.q_norm.weight"), 0u);
}

TEST(TensorTable, Llama2_7bHas291Tensors) {
  const auto slots = expected_tensors(llama2_7b());
  ASSERT_EQ(slots.size(), 3u + 9u * 32u);
  EXPECT_EQ(slots.front().name, "model.embed_tokens.weight");
  EXPECT_EQ(slots.front().shape, (Shape{32000, 4096}));
  EXPECT_EQ(slots.front().layer, -1);
  EXPECT_EQ(slots[slots.size() - 2].name, "model.norm.weight");
  EXPECT_EQ(slots.back().name, "lm_head.weight");
  EXPECT_EQ(slots.back().kind, TensorKind::LmHead);
  EXPECT_EQ(slots.back().shape, (Shape{32000, 4096}));

  // Model order within block 0.
  const std::vector<std::string> block0 = {
      "model.layers.0.input_layernorm.weight",  "model.layers.0.self_attn.q_proj.weight",
      "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
      "model.layers.0.self_attn.o_proj.weight", "model.layers.0.post_attention_layernorm.weight",
      "model.layers.0.mlp.gate_proj.weight",    "model.layers.0.mlp.up_proj.weight",
      "model.layers.0.mlp.down_proj.weight"};
  for (size_t i = 0; i < block0.size(); ++i) {
    EXPECT_EQ(slots[1 + i].name, block0[i]);
    EXPECT_EQ(slots[1 + i].layer, 0);
  }

  const auto m = by_name(slots);
  EXPECT_EQ(m.at("model.layers.31.mlp.down_proj.weight").shape, (Shape{4096, 11008}));
  EXPECT_EQ(m.at("model.layers.31.mlp.down_proj.weight").layer, 31);
  EXPECT_EQ(m.at("model.layers.7.mlp.gate_proj.weight").shape, (Shape{11008, 4096}));
  EXPECT_EQ(m.at("model.layers.7.self_attn.o_proj.weight").shape, (Shape{4096, 4096}));
  EXPECT_EQ(m.at("model.layers.7.input_layernorm.weight").shape, (Shape{4096}));

  // Exactly the seven projection weights per block are quantizable linears.
  EXPECT_EQ(std::count_if(slots.begin(), slots.end(), [](const TensorSlot& s) { return s.is_block_linear; }), 7 * 32);
  for (const TensorSlot& s : slots) {
    const bool proj = s.kind == TensorKind::Q || s.kind == TensorKind::K || s.kind == TensorKind::V ||
                      s.kind == TensorKind::O || s.kind == TensorKind::Gate || s.kind == TensorKind::Up ||
                      s.kind == TensorKind::Down;
    EXPECT_EQ(s.is_block_linear, proj) << s.name;
  }
}

TEST(TensorTable, Qwen25_05bTiedWithQkvBiases) {
  const auto slots = expected_tensors(qwen25_05b());
  // embed + norm, and per block 9 + q/k/v biases; no lm_head (tied), no o_proj bias.
  ASSERT_EQ(slots.size(), 2u + 12u * 24u);
  const auto m = by_name(slots);
  EXPECT_EQ(m.count("lm_head.weight"), 0u);
  EXPECT_EQ(m.count("model.layers.0.self_attn.o_proj.bias"), 0u);
  EXPECT_EQ(m.at("model.layers.0.self_attn.q_proj.bias").shape, (Shape{896}));
  EXPECT_EQ(m.at("model.layers.0.self_attn.k_proj.bias").shape, (Shape{128}));
  EXPECT_EQ(m.at("model.layers.23.self_attn.v_proj.bias").shape, (Shape{128}));
  EXPECT_EQ(m.at("model.layers.23.self_attn.v_proj.bias").kind, TensorKind::VBias);
  EXPECT_FALSE(m.at("model.layers.23.self_attn.v_proj.bias").is_block_linear);
  EXPECT_EQ(slots.back().name, "model.norm.weight");
}

TEST(TensorTable, GqaKvProjShapes) {
  ModelConfig c = llama2_7b();  // Llama-3.1-8B shapes: 8 KV heads
  c.vocab_size = 128256;
  c.intermediate_size = 14336;
  c.num_key_value_heads = 8;
  const auto m = by_name(expected_tensors(c));
  EXPECT_EQ(m.at("model.layers.0.self_attn.q_proj.weight").shape, (Shape{4096, 4096}));
  EXPECT_EQ(m.at("model.layers.0.self_attn.k_proj.weight").shape, (Shape{1024, 4096}));
  EXPECT_EQ(m.at("model.layers.0.self_attn.v_proj.weight").shape, (Shape{1024, 4096}));
  EXPECT_EQ(m.at("model.layers.0.self_attn.o_proj.weight").shape, (Shape{4096, 4096}));

  // Explicit head_dim (Mistral-Nemo): q/o use H*D, not the hidden size.
  c.hidden_size = 5120;
  c.head_dim = 128;
  const auto n = by_name(expected_tensors(c));
  EXPECT_EQ(n.at("model.layers.0.self_attn.q_proj.weight").shape, (Shape{4096, 5120}));
  EXPECT_EQ(n.at("model.layers.0.self_attn.o_proj.weight").shape, (Shape{5120, 4096}));
  EXPECT_EQ(n.at("model.layers.0.self_attn.k_proj.weight").shape, (Shape{1024, 5120}));
}

TEST(TensorTable, LlamaBiasesIncludeOProjAndMlp) {
  ModelConfig c = llama2_7b();
  c.num_hidden_layers = 1;
  c.attention_bias = true;
  c.mlp_bias = true;
  const auto slots = expected_tensors(c);
  EXPECT_EQ(slots.size(), 3u + 9u + 4u + 3u);
  const auto m = by_name(slots);
  EXPECT_EQ(m.at("model.layers.0.self_attn.o_proj.bias").shape, (Shape{4096}));
  EXPECT_EQ(m.at("model.layers.0.mlp.gate_proj.bias").shape, (Shape{11008}));
  EXPECT_EQ(m.at("model.layers.0.mlp.up_proj.bias").shape, (Shape{11008}));
  EXPECT_EQ(m.at("model.layers.0.mlp.down_proj.bias").shape, (Shape{4096}));
}

TEST(TensorTable, CompleteCheckpointIsOk) {
  const auto expected = expected_tensors(llama2_7b());
  const TensorCheck r = check_tensors(expected, as_present(expected));
  EXPECT_TRUE(r.ok()) << r.report();
  EXPECT_EQ(r.report(), "");
}

TEST(TensorTable, FindsMissingUnexpectedAndWrongShape) {
  const auto expected = expected_tensors(llama2_7b());
  auto present = as_present(expected);
  present.erase(std::find_if(present.begin(), present.end(), [](const PresentTensor& p) {
    return p.name == "model.layers.3.mlp.up_proj.weight";
  }));
  present.push_back({"foo.bar", {1}});
  for (PresentTensor& p : present)
    if (p.name == "model.norm.weight") p.shape = {4095};

  const TensorCheck r = check_tensors(expected, present);
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.missing, std::vector<std::string>{"model.layers.3.mlp.up_proj.weight"});
  EXPECT_EQ(r.unexpected, std::vector<std::string>{"foo.bar"});
  ASSERT_EQ(r.wrong_shape.size(), 1u);
  EXPECT_EQ(r.wrong_shape[0].name, "model.norm.weight");
  EXPECT_EQ(r.wrong_shape[0].expected, (Shape{4096}));
  EXPECT_EQ(r.wrong_shape[0].actual, (Shape{4095}));

  const std::string rep = r.report();
  EXPECT_NE(rep.find("missing tensor model.layers.3.mlp.up_proj.weight (expected [I, C] = [11008, 4096])"),
            std::string::npos)
      << rep;
  EXPECT_NE(rep.find("unexpected tensor foo.bar"), std::string::npos) << rep;
  EXPECT_NE(rep.find("wrong shape for model.norm.weight: expected [4096], found [4095]"), std::string::npos) << rep;
}

TEST(TensorTable, InvFreqIgnored) {
  EXPECT_TRUE(is_ignorable_tensor("model.layers.0.self_attn.rotary_emb.inv_freq"));
  EXPECT_FALSE(is_ignorable_tensor("model.layers.0.self_attn.rotary_emb.inv_freq.x"));
  EXPECT_FALSE(is_ignorable_tensor("inv_freq"));
  EXPECT_FALSE(is_ignorable_tensor("model.norm.weight"));

  const auto expected = expected_tensors(llama2_7b());
  auto present = as_present(expected);
  present.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", {64}});
  EXPECT_TRUE(check_tensors(expected, present).ok());
}

// A tied model may still ship lm_head.weight; the right shape is accepted,
// another shape is reported, and an untied model without it misses it.
TEST(TensorTable, TiedModelWithLmHeadCopy) {
  const auto expected = expected_tensors(qwen25_05b());
  auto present = as_present(expected);
  present.push_back({"lm_head.weight", {151936, 896}});
  EXPECT_TRUE(check_tensors(expected, present).ok());

  present.back().shape = {151936, 895};
  const TensorCheck bad = check_tensors(expected, present);
  ASSERT_EQ(bad.wrong_shape.size(), 1u);
  EXPECT_EQ(bad.wrong_shape[0].name, "lm_head.weight");
  EXPECT_TRUE(bad.unexpected.empty());

  const auto untied = expected_tensors(llama2_7b());
  auto no_head = as_present(untied);
  no_head.pop_back();
  EXPECT_EQ(check_tensors(untied, no_head).missing, std::vector<std::string>{"lm_head.weight"});
}

TEST(TensorTable, ReportTruncates) {
  const auto expected = expected_tensors(llama2_7b());
  std::vector<PresentTensor> present = {{"a", {1}}, {"b", {1}}, {"c", {1}}};
  const TensorCheck r = check_tensors(expected, present);
  EXPECT_EQ(r.missing.size(), 291u);
  EXPECT_EQ(r.unexpected.size(), 3u);

  const std::string rep = r.report(5);
  size_t missing_lines = 0;
  for (size_t at = rep.find("missing tensor "); at != std::string::npos; at = rep.find("missing tensor ", at + 1))
    ++missing_lines;
  EXPECT_EQ(missing_lines, 5u) << rep;
  EXPECT_NE(rep.find("... and 286 more"), std::string::npos) << rep;
  EXPECT_NE(rep.find("unexpected tensor c"), std::string::npos) << rep;  // 3 <= 5: all listed

  const std::string rep2 = r.report(2);
  EXPECT_NE(rep2.find("... and 289 more"), std::string::npos) << rep2;
  EXPECT_NE(rep2.find("... and 1 more"), std::string::npos) << rep2;
  EXPECT_EQ(rep2.find("unexpected tensor c"), std::string::npos) << rep2;
}

TEST(TensorTable, KindNames) {
  EXPECT_EQ(tensor_kind_name(TensorKind::Embed), "embed");
  EXPECT_EQ(tensor_kind_name(TensorKind::Q), "q");
  EXPECT_EQ(tensor_kind_name(TensorKind::KBias), "k_bias");
  EXPECT_EQ(tensor_kind_name(TensorKind::Down), "down");
  EXPECT_EQ(tensor_kind_name(TensorKind::LmHead), "lm_head");
  // Every kind in the expected list of a model with all options has a distinct name.
  ModelConfig c = llama2_7b();
  c.num_hidden_layers = 1;
  c.attention_bias = c.mlp_bias = true;
  std::map<std::string_view, TensorKind> names;
  for (const TensorSlot& s : expected_tensors(c)) {
    auto [it, fresh] = names.emplace(tensor_kind_name(s.kind), s.kind);
    EXPECT_TRUE(fresh || it->second == s.kind) << tensor_kind_name(s.kind);
  }
  EXPECT_EQ(names.size(), 19u);
}

// The real checkpoint in the fixtures holds exactly the tensors its config implies.
TEST(TensorTable, Stories260KFixtureMatches) {
  QLORA_REQUIRE_FIXTURES(fx);
  const std::filesystem::path dir = fx / "models/stories260K/hf";
  const ModelConfig cfg = load_model_config(dir);
  const SafetensorsModel model(dir);
  std::vector<PresentTensor> present;
  for (const std::string& name : model.names()) present.push_back({name, model.at(name).info->shape});
  const auto expected = expected_tensors(cfg);
  const TensorCheck r = check_tensors(expected, present);
  EXPECT_TRUE(r.ok()) << r.report();
  EXPECT_EQ(by_name(expected).at("model.layers.0.self_attn.k_proj.weight").shape,
            (Shape{cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size}));
}

}  // namespace
}  // namespace qlora
