// `qlora quantize` as a library call: the output is a complete bitsandbytes
// 4-bit folder whose codes are those of the reference quantizer, sharding is
// transparent, and bad input leaves nothing behind.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/builtin.h"
#include "model/tensor_table.h"
#include "quant/bnb_layout.h"
#include "testing.h"
#include "tools/inspect_model.h"
#include "tools/quantize_model.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::ScratchDir;

std::vector<float> as_f32(const SafetensorsModel& m, const std::string& name) {
  const auto& e = m.at(name);
  std::vector<float> v(size_t(e.info->numel()));
  convert_to_f32(e.file->data(*e.info).data(), e.info->dtype, v.size(), v.data());
  return v;
}

size_t entries_in(const fs::path& dir) {
  return size_t(std::distance(fs::directory_iterator(dir), fs::directory_iterator{}));
}

TEST(QuantizeModel, BuiltinTinyBecomesABnb4bitFolder) {
  ScratchDir dir;
  write_builtin_model("tiny", dir / "hf");
  const QuantizeReport r = quantize_model(dir / "hf", dir / "nf4", {});
  const ModelConfig cfg = load_model_config(dir / "hf");
  EXPECT_EQ(r.quantized_tensors, 7 * cfg.num_hidden_layers);
  EXPECT_EQ(r.shards, 1);
  EXPECT_EQ(entries_in(dir.path()), 2u) << "no temporary folder left behind";

  const ModelConfig qcfg = load_model_config(dir / "nf4");
  ASSERT_TRUE(qcfg.quantization.has_value());
  EXPECT_EQ(qcfg.quantization->quant_type, "nf4");
  EXPECT_TRUE(qcfg.quantization->double_quant);
  EXPECT_TRUE(fs::exists(dir / "nf4" / "generation_config.json"));

  const SafetensorsModel in(dir / "hf"), out(dir / "nf4");
  for (const TensorSlot& s : expected_tensors(cfg)) {
    SCOPED_TRACE(s.name);
    const auto x = as_f32(in, s.name);
    if (s.is_block_linear) {
      DType dt;
      const Quant4Tensor q = load_bnb_weight(out, s.name, &dt);
      EXPECT_EQ(dt, DType::BF16);
      EXPECT_EQ(q.shape, s.shape);
      // Bit for bit the reference quantizer applied to the input values.
      const Quant4Tensor ref = quantize_tensor(x.data(), s.shape, Quant4Type::NF4, 64, true);
      EXPECT_EQ(q.codes, ref.codes);
      EXPECT_EQ(q.nested->codes, ref.nested->codes);
      EXPECT_EQ(q.nested->nested_absmax, ref.nested->nested_absmax);
      EXPECT_EQ(q.nested->offset, ref.nested->offset);
    } else {
      // Kept tensors: BF16 input copied byte for byte.
      const auto& e = out.at(s.name);
      EXPECT_EQ(e.info->dtype, DType::BF16);
      const auto a = in.data(s.name), b = out.data(s.name);
      EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end()));
    }
  }
  // Every output tensor is accounted for: 6 per quantized weight + kept ones.
  EXPECT_EQ(out.names().size(), size_t(6 * r.quantized_tensors + r.kept_tensors));
}

TEST(QuantizeModel, ShardedOutputHoldsTheSameTensors) {
  ScratchDir dir;
  write_builtin_model("tiny", dir / "hf");
  QuantizeOptions one, many;
  many.max_shard_bytes = 64 * 1024;
  quantize_model(dir / "hf", dir / "one", one);
  const QuantizeReport r = quantize_model(dir / "hf", dir / "many", many);
  EXPECT_GT(r.shards, 3);
  EXPECT_TRUE(fs::exists(dir / "many" / "model.safetensors.index.json"));
  char first[64];
  std::snprintf(first, sizeof first, "model-00001-of-%05lld.safetensors", static_cast<long long>(r.shards));
  EXPECT_TRUE(fs::exists(dir / "many" / first)) << first;
  const SafetensorsModel a(dir / "one"), b(dir / "many");
  ASSERT_EQ(a.names(), b.names());
  for (const auto& n : a.names()) {
    const auto x = a.data(n), y = b.data(n);
    EXPECT_TRUE(std::equal(x.begin(), x.end(), y.begin(), y.end())) << n;
  }
}

TEST(QuantizeModel, Fp4PlainAndOtherBlockSizes) {
  ScratchDir dir;
  write_builtin_model("tiny", dir / "hf");
  QuantizeOptions o;
  o.type = Quant4Type::FP4;
  o.block = 128;
  o.double_quant = false;
  quantize_model(dir / "hf", dir / "fp4", o);
  const Inspection in = inspect_model(dir / "fp4");
  ASSERT_GT(in.quantized_tensors, 0);
  for (const auto& t : in.tensors)
    if (t.quant) {
      EXPECT_EQ(t.quant->type, Quant4Type::FP4);
      EXPECT_EQ(t.quant->block, 128);
      EXPECT_FALSE(t.quant->nested);
    }
  EXPECT_TRUE(in.problems.empty());
}

uint64_t fnv1a64(std::span<const uint8_t> b) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (uint8_t c : b) h = (h ^ c) * 0x100000001b3ull;
  return h;
}

std::string hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// The fixture model (a real trained Llama, F32) quantizes to the codes and
// scales the independent reference computes: digests in
// tests/reference/stories260K_nf4.json, written by
// tests/reference/make_quant_golden.py (re-run it if the fixture changes).
TEST(QuantizeModel, Stories260KMatchesTheReferenceBitForBit) {
  QLORA_REQUIRE_FIXTURES(fx);
  ScratchDir dir;
  const fs::path src = fx / "models" / "stories260K" / "hf";
  const QuantizeReport r = quantize_model(src, dir / "nf4", {});
  std::ifstream f(std::string(QLORA_SOURCE_DIR) + "/tests/reference/stories260K_nf4.json");
  const auto golden = nlohmann::json::parse(f);
  ASSERT_EQ(golden.at("version"), "1");
  const SafetensorsModel out(dir / "nf4");
  ASSERT_EQ(int64_t(golden.at("tensors").size()), r.quantized_tensors);
  for (const auto& [name, d] : golden.at("tensors").items()) {
    SCOPED_TRACE(name);
    const BnbNames nm = bnb_names(name, Quant4Type::NF4);
    EXPECT_EQ(hex(fnv1a64(out.data(nm.weight))), d.at("codes").get<std::string>());
    EXPECT_EQ(hex(fnv1a64(out.data(nm.absmax))), d.at("absmax").get<std::string>());
    EXPECT_EQ(hex(fnv1a64(out.data(nm.nested_absmax))), d.at("nested_absmax").get<std::string>());
    const Quant4Tensor q = load_bnb_weight(out, name);
    const auto off = std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&q.nested->offset), 4);
    EXPECT_EQ(hex(fnv1a64(off)), d.at("offset").get<std::string>());
  }
  // inspect reads the result back: same architecture, same parameter count.
  const Inspection in = inspect_model(dir / "nf4");
  EXPECT_TRUE(in.problems.empty());
  EXPECT_EQ(in.params, r.params);
  EXPECT_EQ(in.quantized_tensors, r.quantized_tensors);
  // Tied embeddings: no lm_head written; tokenizer files copied.
  EXPECT_EQ(out.find("lm_head.weight"), nullptr);
  EXPECT_TRUE(fs::exists(dir / "nf4" / "tokenizer.json"));
  EXPECT_TRUE(fs::exists(dir / "nf4" / "tokenizer.model"));
}

TEST(QuantizeModel, BadInputLeavesNothingBehind) {
  ScratchDir dir;
  write_builtin_model("tiny", dir / "hf");
  // Missing input.
  EXPECT_NE(error_of([&] { quantize_model(dir / "nope", dir / "o1", {}); }).find("nope"), std::string::npos);
  // Output exists: refused unless forced, old content untouched.
  fs::create_directories(dir / "taken");
  testing::write_bytes(dir / "taken" / "keep.txt", "x");
  EXPECT_NE(error_of([&] { quantize_model(dir / "hf", dir / "taken", {}); }).find("already exists"),
            std::string::npos);
  EXPECT_TRUE(fs::exists(dir / "taken" / "keep.txt"));
  QuantizeOptions force;
  force.force = true;
  quantize_model(dir / "hf", dir / "taken", force);
  EXPECT_FALSE(fs::exists(dir / "taken" / "keep.txt"));
  // Bad block size.
  QuantizeOptions bad;
  bad.block = 48;
  EXPECT_NE(error_of([&] { quantize_model(dir / "hf", dir / "o2", bad); }).find("48"), std::string::npos);
  // Already quantized.
  EXPECT_NE(error_of([&] { quantize_model(dir / "taken", dir / "o3", {}); }).find("already quantized"),
            std::string::npos);
  // A wrongly shaped tensor is reported by name, and no output appears.
  {
    const SafetensorsModel m(dir / "hf");
    std::vector<OwnedTensor> ts;
    for (const auto& n : m.names()) {
      const auto& e = m.at(n);
      const auto d = m.data(n);
      ts.push_back({n, e.info->dtype, e.info->shape, std::vector<uint8_t>(d.begin(), d.end())});
    }
    for (auto& t : ts)
      if (t.name == "model.norm.weight") t.shape = {t.shape[0] / 2, 2};
    fs::create_directories(dir / "broken");
    fs::copy_file(dir / "hf" / "config.json", dir / "broken" / "config.json");
    save_safetensors(dir / "broken" / "model.safetensors", ts);
  }
  const std::string e = error_of([&] { quantize_model(dir / "broken", dir / "o4", {}); });
  EXPECT_NE(e.find("model.norm.weight"), std::string::npos) << e;
  for (const char* o : {"o1", "o2", "o3", "o4"}) EXPECT_FALSE(fs::exists(dir / o)) << o;
  for (const auto& entry : fs::directory_iterator(dir.path()))
    EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos) << entry.path();
}

TEST(QuantizeModel, ConfigGetsTheTransformersQuantizationConfig) {
  const auto j = nlohmann::json::parse(bnb_quantization_config_json({}));
  EXPECT_EQ(j.at("quant_method"), "bitsandbytes");
  EXPECT_EQ(j.at("load_in_4bit"), true);
  EXPECT_EQ(j.at("bnb_4bit_quant_type"), "nf4");
  EXPECT_EQ(j.at("bnb_4bit_use_double_quant"), true);
  EXPECT_EQ(j.at("bnb_4bit_quant_storage"), "uint8");
  // Our own config parser reads it back as a 4-bit checkpoint.
  ScratchDir dir;
  write_builtin_model("tiny", dir / "hf");
  quantize_model(dir / "hf", dir / "q", {});
  EXPECT_TRUE(load_model_config(dir / "q").quantization.has_value());
}

}  // namespace
}  // namespace qlora
