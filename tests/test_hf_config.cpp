// config.json parsing: real public configs (abridged to the keys that matter,
// values as published), transformers' defaults, and every error path.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/hf_config.h"
#include "model/tensor_table.h"
#include "testing.h"

namespace qlora {
namespace {

using testing::error_of;

using nlohmann::json;
using testing::ScratchDir;
using testing::write_bytes;

// Writes `text` as <scratch>/config.json and loads it through the folder, the
// way the tools do.
ModelConfig load_text(const std::string& text) {
  ScratchDir dir;
  write_bytes(dir / "config.json", text);
  return load_model_config(dir.path());
}

std::string parse_error(const std::string& text) {
  return error_of([&] { parse_model_config(json::parse(text), "config.json"); });
}

// The smallest config each architecture accepts; tests add or change keys.
json minimal(const char* model_type) {
  return json{{"model_type", model_type}, {"vocab_size", 1000},       {"hidden_size", 256},
              {"intermediate_size", 688}, {"num_hidden_layers", 2}, {"num_attention_heads", 8}};
}

TEST(HfConfig, Llama2_7b) {
  const ModelConfig c = load_text(R"({
    "_name_or_path": "meta-llama/Llama-2-7b-hf",
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": null,
    "tie_word_embeddings": false,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": true,
    "vocab_size": 32000
  })");
  EXPECT_EQ(c.arch, Arch::Llama);
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 11008);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 32);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.q_dim(), 4096);
  EXPECT_EQ(c.kv_dim(), 4096);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::None);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.torch_dtype, "float16");
  EXPECT_EQ(c.bos_token_ids, std::vector<int64_t>{1});
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_FALSE(c.quantization.has_value());
}

// The Instruct variant: its config lists three end-of-sequence ids.
TEST(HfConfig, Llama31_8bInstruct) {
  const ModelConfig c = load_text(R"({
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": false,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": false,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192,
      "rope_type": "llama3"
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": false,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3",
    "use_cache": true,
    "vocab_size": 128256
  })");
  EXPECT_EQ(c.arch, Arch::Llama);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.kv_dim(), 1024);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::Llama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_EQ(c.bos_token_ids, std::vector<int64_t>{128000});
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
}

TEST(HfConfig, Mistral7bV01) {
  const ModelConfig c = load_text(R"({
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": false,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": true,
    "vocab_size": 32000
  })");
  EXPECT_EQ(c.arch, Arch::Mistral);
  EXPECT_EQ(c.model_type, "mistral");
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::None);
  ASSERT_TRUE(c.sliding_window.has_value());
  EXPECT_EQ(*c.sliding_window, 4096);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
}

// Mistral-7B-v0.2 and later write "sliding_window": null (full attention).
TEST(HfConfig, MistralSlidingWindowNullAndAbsent) {
  json j = minimal("mistral");
  j["sliding_window"] = nullptr;
  EXPECT_FALSE(parse_model_config(j, "config.json").sliding_window.has_value());
  j.erase("sliding_window");  // MistralConfig's default
  EXPECT_EQ(parse_model_config(j, "config.json").sliding_window, std::optional<int64_t>(4096));
}

TEST(HfConfig, Qwen25_7bInstruct) {
  const ModelConfig c = load_text(R"({
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": false,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": true,
    "use_sliding_window": false,
    "vocab_size": 152064
  })");
  EXPECT_EQ(c.arch, Arch::Qwen2);
  EXPECT_EQ(c.model_type, "qwen2");
  EXPECT_EQ(c.vocab_size, 152064);
  EXPECT_EQ(c.hidden_size, 3584);
  EXPECT_EQ(c.intermediate_size, 18944);
  EXPECT_EQ(c.num_hidden_layers, 28);
  EXPECT_EQ(c.num_attention_heads, 28);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.kv_dim(), 512);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_TRUE(c.attention_bias);  // implied by qwen2, not written in the file
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.sliding_window.has_value());  // use_sliding_window is false
  EXPECT_EQ(c.bos_token_ids, std::vector<int64_t>{151643});
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{151645});
}

TEST(HfConfig, Qwen25_05bTied) {
  const ModelConfig c = load_text(R"({
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": true,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": true,
    "use_mrope": false,
    "use_sliding_window": false,
    "vocab_size": 151936
  })");
  EXPECT_EQ(c.arch, Arch::Qwen2);
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_EQ(c.hidden_size, 896);
  EXPECT_EQ(c.intermediate_size, 4864);
  EXPECT_EQ(c.num_hidden_layers, 24);
  EXPECT_EQ(c.num_attention_heads, 14);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FALSE(c.sliding_window.has_value());
}

// Qwen2Config / Qwen3Config (transformers 5.25): the window applies only with
// use_sliding_window, to the layers with index >= max_window_layers (default
// 28), or to those layer_types marks "sliding_attention".
TEST(HfConfig, Qwen2SlidingWindowOnlyWhenEnabled) {
  for (const char* arch : {"qwen2", "qwen3"}) {
    SCOPED_TRACE(arch);
    json j = minimal(arch);  // 2 layers
    j["sliding_window"] = 4096;
    j["max_window_layers"] = 0;
    EXPECT_FALSE(parse_model_config(j, "config.json").sliding_window.has_value());
    j["use_sliding_window"] = true;
    ModelConfig c = parse_model_config(j, "config.json");
    EXPECT_EQ(c.sliding_window, std::optional<int64_t>(4096));
    EXPECT_EQ(c.attention_window(0), 4096);
    EXPECT_EQ(c.attention_window(1), 4096);
    j["sliding_window"] = 1024;
    j["max_window_layers"] = 1;
    c = parse_model_config(j, "config.json");
    EXPECT_EQ(c.attention_window(0), 0);
    EXPECT_EQ(c.attention_window(1), 1024);
    // The class default of 28 covers both layers: no layer slides, so no window at all.
    j.erase("max_window_layers");
    EXPECT_FALSE(parse_model_config(j, "config.json").sliding_window.has_value());
    // layer_types wins over max_window_layers.
    j["max_window_layers"] = 1;
    j["layer_types"] = {"sliding_attention", "full_attention"};
    c = parse_model_config(j, "config.json");
    EXPECT_EQ(c.attention_window(0), 1024);
    EXPECT_EQ(c.attention_window(1), 0);
    j["sliding_window"] = nullptr;  // null: none, whatever the flags say
    EXPECT_FALSE(parse_model_config(j, "config.json").sliding_window.has_value());
    j["sliding_window"] = 1024;
    for (const json& bad : {json{"sliding_attention"}, json{"full_attention", "chunked_attention"}, json("full")}) {
      j["layer_types"] = bad;
      const std::string e = error_of([&] { parse_model_config(j, "config.json"); });
      EXPECT_NE(e.find("\"layer_types\""), std::string::npos) << e;
      EXPECT_NE(e.find("one per layer"), std::string::npos) << e;
    }
    j.erase("layer_types");
    j["max_window_layers"] = -1;
    EXPECT_NE(error_of([&] { parse_model_config(j, "config.json"); }).find("max_window_layers"), std::string::npos);
  }
}

// Qwen/Qwen3-0.6B's config.json: head_dim 128 with hidden 1024 and 16 heads
// (q_proj 1024 -> 2048), q/k norms, no biases, tied embeddings.
TEST(HfConfig, Qwen3_06b) {
  const ModelConfig c = load_text(R"({
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null, "tie_word_embeddings": true,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
    "use_sliding_window": false, "vocab_size": 151936
  })");
  EXPECT_EQ(c.arch, Arch::Qwen3);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.q_dim(), 2048);
  EXPECT_EQ(c.kv_dim(), 1024);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_FALSE(c.sliding_window.has_value());
  EXPECT_EQ(c.max_position_embeddings, 40960);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{151645});
  const std::vector<TensorSlot> slots = expected_tensors(c);
  int norms = 0;
  for (const TensorSlot& s : slots) {
    if (s.kind == TensorKind::QNorm || s.kind == TensorKind::KNorm) {
      ++norms;
      EXPECT_EQ(s.shape, Shape{128}) << s.name;
    }
    if (s.name == "model.layers.0.self_attn.q_proj.weight") {
      EXPECT_EQ(s.shape, (Shape{2048, 1024}));
    }
    if (s.name == "model.layers.0.self_attn.o_proj.weight") {
      EXPECT_EQ(s.shape, (Shape{1024, 2048}));
    }
    EXPECT_NE(s.kind, TensorKind::QBias) << s.name;
    EXPECT_NE(s.kind, TensorKind::LmHead) << s.name;
  }
  EXPECT_EQ(norms, 2 * 28);
  EXPECT_EQ(slots[2].name, "model.layers.0.self_attn.q_proj.weight");
}

// lmsys/vicuna-7b-v1.5-16k: legacy "type" key, linear interpolation by 4.
TEST(HfConfig, LinearRopeScaling) {
  const ModelConfig c = load_text(R"({
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 4.0, "type": "linear"},
    "tie_word_embeddings": false,
    "torch_dtype": "float16",
    "vocab_size": 32000
  })");
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::Linear);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 4.0);
  EXPECT_EQ(c.max_position_embeddings, 4096);
}

TEST(HfConfig, RopeScalingDefaultIsNone) {
  json j = minimal("llama");
  j["rope_scaling"] = {{"rope_type", "default"}};
  EXPECT_EQ(parse_model_config(j, "config.json").rope_scaling.type, RopeScalingType::None);
}

// Newer transformers write "rope_parameters" (carrying rope_theta) and "dtype".
TEST(HfConfig, NewerKeyNames) {
  json j = minimal("llama");
  j["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 250000.0}};
  j["dtype"] = "bfloat16";
  const ModelConfig c = parse_model_config(j, "config.json");
  EXPECT_DOUBLE_EQ(c.rope_theta, 250000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::Linear);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 2.0);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
}

// unsloth/llama-3-8b-bnb-4bit: the quantization_config transformers writes.
TEST(HfConfig, Bnb4bitQuantizationConfig) {
  const ModelConfig c = load_text(R"({
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "quantization_config": {
      "_load_in_4bit": true,
      "_load_in_8bit": false,
      "bnb_4bit_compute_dtype": "bfloat16",
      "bnb_4bit_quant_storage": "uint8",
      "bnb_4bit_quant_type": "nf4",
      "bnb_4bit_use_double_quant": true,
      "llm_int8_enable_fp32_cpu_offload": false,
      "llm_int8_has_fp16_weight": false,
      "llm_int8_skip_modules": null,
      "llm_int8_threshold": 6.0,
      "load_in_4bit": true,
      "load_in_8bit": false,
      "quant_method": "bitsandbytes"
    },
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256
  })");
  ASSERT_TRUE(c.quantization.has_value());
  EXPECT_EQ(c.quantization->quant_type, "nf4");
  EXPECT_TRUE(c.quantization->double_quant);
  EXPECT_EQ(c.quantization->compute_dtype, "bfloat16");
  EXPECT_EQ(c.quantization->quant_storage, "uint8");
  EXPECT_TRUE(c.quantization->skip_modules.empty());
  EXPECT_EQ(c.num_key_value_heads, 8);
}

TEST(HfConfig, Bnb4bitFp4WithSkipModules) {
  json j = minimal("llama");
  j["quantization_config"] = {{"quant_method", "bitsandbytes"},       {"_load_in_4bit", true},
                              {"bnb_4bit_quant_type", "fp4"},         {"bnb_4bit_use_double_quant", false},
                              {"bnb_4bit_compute_dtype", "float16"}, {"llm_int8_skip_modules", {"lm_head"}}};
  const ModelConfig c = parse_model_config(j, "config.json");
  ASSERT_TRUE(c.quantization.has_value());
  EXPECT_EQ(c.quantization->quant_type, "fp4");
  EXPECT_FALSE(c.quantization->double_quant);
  EXPECT_EQ(c.quantization->compute_dtype, "float16");
  EXPECT_EQ(c.quantization->skip_modules, std::vector<std::string>{"lm_head"});
}

TEST(HfConfig, OtherQuantizationRejected) {
  json j = minimal("llama");
  j["quantization_config"] = {{"quant_method", "gptq"}, {"bits", 4}};
  std::string msg = error_of([&] { parse_model_config(j, "config.json"); });
  EXPECT_NE(msg.find("gptq"), std::string::npos) << msg;
  EXPECT_NE(msg.find("only bitsandbytes 4-bit"), std::string::npos) << msg;

  j["quantization_config"] = {{"quant_method", "bitsandbytes"}, {"load_in_8bit", true}, {"load_in_4bit", false}};
  msg = error_of([&] { parse_model_config(j, "config.json"); });
  EXPECT_NE(msg.find("8-bit"), std::string::npos) << msg;
  EXPECT_NE(msg.find("only bitsandbytes 4-bit"), std::string::npos) << msg;
}

TEST(HfConfig, DefaultsWhenKeysAbsent) {
  const ModelConfig llama = parse_model_config(minimal("llama"), "config.json");
  EXPECT_EQ(llama.num_key_value_heads, 8);  // = num_attention_heads
  EXPECT_EQ(llama.head_dim, 32);            // 256 / 8
  EXPECT_EQ(llama.max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(llama.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(llama.rope_theta, 10000.0);
  EXPECT_FALSE(llama.tie_word_embeddings);
  EXPECT_FALSE(llama.attention_bias);
  EXPECT_EQ(llama.torch_dtype, "float32");
  EXPECT_EQ(llama.bos_token_ids, std::vector<int64_t>{1});
  EXPECT_EQ(llama.eos_token_ids, std::vector<int64_t>{2});

  const ModelConfig mistral = parse_model_config(minimal("mistral"), "config.json");
  EXPECT_EQ(mistral.max_position_embeddings, 4096 * 32);  // MistralConfig's default
  EXPECT_EQ(mistral.sliding_window, std::optional<int64_t>(4096));

  const ModelConfig qwen = parse_model_config(minimal("qwen2"), "config.json");
  EXPECT_EQ(qwen.max_position_embeddings, 32768);
  EXPECT_TRUE(qwen.attention_bias);
  EXPECT_FALSE(qwen.tie_word_embeddings);
  EXPECT_TRUE(qwen.bos_token_ids.empty());

  json j = minimal("llama");
  j["head_dim"] = nullptr;  // null means "derive it"
  j["eos_token_id"] = nullptr;
  const ModelConfig n = parse_model_config(j, "config.json");
  EXPECT_EQ(n.head_dim, 32);
  EXPECT_TRUE(n.eos_token_ids.empty());
}

// Mistral-Nemo: head_dim 128 although 5120 / 32 = 160.
TEST(HfConfig, ExplicitHeadDim) {
  json j = minimal("mistral");
  j["hidden_size"] = 5120;
  j["num_attention_heads"] = 32;
  j["num_key_value_heads"] = 8;
  j["head_dim"] = 128;
  const ModelConfig c = parse_model_config(j, "config.json");
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.q_dim(), 4096);
  EXPECT_EQ(c.kv_dim(), 1024);

  // With an explicit head_dim the hidden size need not divide by the heads.
  j["hidden_size"] = 5000;
  EXPECT_EQ(parse_model_config(j, "config.json").head_dim, 128);
}

TEST(HfConfig, UnknownModelTypeListsSupported) {
  json j = minimal("llama");
  j["model_type"] = "gpt2";
  const std::string msg = error_of([&] { parse_model_config(j, "config.json"); });
  EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"gpt2\" is not supported"), std::string::npos) << msg;
  EXPECT_NE(msg.find("llama, mistral, qwen2, qwen3"), std::string::npos) << msg;

  j.erase("model_type");
  EXPECT_NE(error_of([&] { parse_model_config(j, "config.json"); }).find("model_type"), std::string::npos);
}

TEST(HfConfig, MissingRequiredKey) {
  json j = minimal("llama");
  j.erase("hidden_size");
  const std::string msg = error_of([&] { parse_model_config(j, "config.json"); });
  EXPECT_NE(msg.find("config.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"hidden_size\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("missing"), std::string::npos) << msg;
}

TEST(HfConfig, WrongTypesNameKeyAndExpectation) {
  json j = minimal("llama");
  j["num_attention_heads"] = "32";
  EXPECT_EQ(error_of([&] { parse_model_config(j, "config.json"); }),
            "config.json: \"num_attention_heads\" must be a positive integer, got \"32\"");

  j = minimal("llama");
  j["vocab_size"] = 0;
  EXPECT_NE(error_of([&] { parse_model_config(j, "config.json"); }).find("\"vocab_size\" must be a positive integer, got 0"),
            std::string::npos);

  j = minimal("llama");
  j["intermediate_size"] = 688.0;  // integers only
  EXPECT_NE(error_of([&] { parse_model_config(j, "config.json"); }).find("\"intermediate_size\""), std::string::npos);

  j = minimal("llama");
  j["tie_word_embeddings"] = "false";
  EXPECT_EQ(error_of([&] { parse_model_config(j, "config.json"); }),
            "config.json: \"tie_word_embeddings\" must be true or false, got \"false\"");

  j = minimal("llama");
  j["rms_norm_eps"] = "1e-5";
  EXPECT_NE(error_of([&] { parse_model_config(j, "config.json"); }).find("\"rms_norm_eps\" must be a positive number"),
            std::string::npos);

  j = minimal("llama");
  j["eos_token_id"] = {1, "2"};
  EXPECT_NE(error_of([&] { parse_model_config(j, "config.json"); }).find("\"eos_token_id\""), std::string::npos);

  j = minimal("llama");
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", "4"}};
  EXPECT_NE(error_of([&] { parse_model_config(j, "config.json"); }).find("\"rope_scaling.factor\" must be a positive number"),
            std::string::npos);

  j = minimal("llama");
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0}};
  EXPECT_NE(error_of([&] { parse_model_config(j, "config.json"); }).find("original_max_position_embeddings"),
            std::string::npos);

  EXPECT_NE(parse_error("[1, 2]").find("object"), std::string::npos);
}

TEST(HfConfig, HeadsMustDivide) {
  json j = minimal("llama");
  j["num_attention_heads"] = 7;  // 256 % 7 != 0, no head_dim
  std::string msg = error_of([&] { parse_model_config(j, "config.json"); });
  EXPECT_NE(msg.find("hidden_size (256) is not divisible by num_attention_heads (7)"), std::string::npos) << msg;

  j = minimal("llama");
  j["num_key_value_heads"] = 3;  // 8 % 3 != 0
  msg = error_of([&] { parse_model_config(j, "config.json"); });
  EXPECT_NE(msg.find("GQA groups must be whole"), std::string::npos) << msg;
  EXPECT_NE(msg.find("num_key_value_heads (3)"), std::string::npos) << msg;
}

TEST(HfConfig, UnsupportedRopeType) {
  json j = minimal("llama");
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32768}};
  std::string msg = error_of([&] { parse_model_config(j, "config.json"); });
  EXPECT_NE(msg.find("\"yarn\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("none, linear, llama3"), std::string::npos) << msg;

  j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  msg = error_of([&] { parse_model_config(j, "config.json"); });
  EXPECT_NE(msg.find("\"dynamic\""), std::string::npos) << msg;
}

TEST(HfConfig, BadJsonFileNamesPathAndParserError) {
  ScratchDir dir;
  write_bytes(dir / "config.json", "{\"model_type\": \"llama\",\n \"vocab_size\": 32000,,}");
  const std::string msg = error_of([&] { load_model_config(dir.path()); });
  EXPECT_NE(msg.find((dir / "config.json").string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("parse error"), std::string::npos) << msg;  // nlohmann's own message
}

TEST(HfConfig, MissingFolderOrFile) {
  ScratchDir dir;
  std::string msg = error_of([&] { load_model_config(dir / "no_such_model"); });
  EXPECT_NE(msg.find((dir / "no_such_model").string()), std::string::npos) << msg;

  // An existing folder without config.json.
  msg = error_of([&] { load_model_config(dir.path()); });
  EXPECT_NE(msg.find(dir.path().string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("no config.json"), std::string::npos) << msg;
}

TEST(HfConfig, LoadsFileDirectly) {
  ScratchDir dir;
  write_bytes(dir / "my.json", minimal("qwen2").dump());
  EXPECT_EQ(load_model_config(dir / "my.json").arch, Arch::Qwen2);
}

TEST(HfConfig, Names) {
  EXPECT_EQ(arch_name(Arch::Llama), "llama");
  EXPECT_EQ(arch_name(Arch::Mistral), "mistral");
  EXPECT_EQ(arch_name(Arch::Qwen2), "qwen2");
  EXPECT_EQ(rope_scaling_name(RopeScalingType::None), "none");
  EXPECT_EQ(rope_scaling_name(RopeScalingType::Linear), "linear");
  EXPECT_EQ(rope_scaling_name(RopeScalingType::Llama3), "llama3");
}

TEST(HfConfig, Stories260KFixture) {
  QLORA_REQUIRE_FIXTURES(fx);
  const std::filesystem::path dir = fx / "models/stories260K/hf";
  const ModelConfig c = load_model_config(dir);
  // Compare against the file itself rather than copied numbers.
  const json j = json::parse(testing::read_bytes(dir / "config.json"));
  EXPECT_EQ(c.arch, Arch::Llama);
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.vocab_size, j.at("vocab_size").get<int64_t>());
  EXPECT_EQ(c.hidden_size, j.at("hidden_size").get<int64_t>());
  EXPECT_EQ(c.intermediate_size, j.at("intermediate_size").get<int64_t>());
  EXPECT_EQ(c.num_hidden_layers, j.at("num_hidden_layers").get<int64_t>());
  EXPECT_EQ(c.num_attention_heads, j.at("num_attention_heads").get<int64_t>());
  EXPECT_EQ(c.num_key_value_heads, j.value("num_key_value_heads", c.num_attention_heads));
  EXPECT_EQ(c.head_dim, j.value("head_dim", c.hidden_size / c.num_attention_heads));
  EXPECT_EQ(c.max_position_embeddings, j.at("max_position_embeddings").get<int64_t>());
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, j.at("rms_norm_eps").get<double>());
  EXPECT_DOUBLE_EQ(c.rope_theta, j.value("rope_theta", 10000.0));
  EXPECT_EQ(c.tie_word_embeddings, j.value("tie_word_embeddings", false));
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::None);
  EXPECT_EQ(c.num_attention_heads % c.num_key_value_heads, 0);
}

}  // namespace
}  // namespace qlora
