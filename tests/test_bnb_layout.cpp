// The bitsandbytes 4-bit safetensors layout: names, dtypes and shapes of the
// companion tensors, round trip through a file, and refusal of broken ones.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/error.h"
#include "io/safetensors.h"
#include "quant/bnb_layout.h"
#include "quant/dynamic_map.h"
#include "testing.h"

namespace qlora {
namespace {

using testing::ScratchDir;

TEST(BnbLayout, PythonFloatRepr) {
  // Expected strings are Python's repr() of the same doubles.
  EXPECT_EQ(python_float_repr(double(0.1f)), "0.10000000149011612");
  EXPECT_EQ(python_float_repr(double(2.5e-05f)), "2.499999936844688e-05");
  EXPECT_EQ(python_float_repr(double(1e-4f)), "9.999999747378752e-05");
  EXPECT_EQ(python_float_repr(double(12345.678f)), "12345.677734375");
  EXPECT_EQ(python_float_repr(1e16), "1e+16");
  EXPECT_EQ(python_float_repr(1.5e-07), "1.5e-07");
  EXPECT_EQ(python_float_repr(123456.0), "123456.0");
  EXPECT_EQ(python_float_repr(0.0001), "0.0001");
  EXPECT_EQ(python_float_repr(-0.0), "-0.0");
  EXPECT_EQ(python_float_repr(5e-324), "5e-324");
}

TEST(BnbLayout, TensorNamesDtypesAndShapes) {
  const auto x = testing::randn(int64_t(64 * 96), 1, 0.02f);
  const Quant4Tensor q = quantize_tensor(x.data(), {64, 96}, Quant4Type::NF4, 64, true);
  const auto ts = bnb_tensors("model.layers.0.mlp.up_proj.weight", q, DType::BF16);
  ASSERT_EQ(ts.size(), 6u);
  const std::string w = "model.layers.0.mlp.up_proj.weight";
  EXPECT_EQ(ts[0].name, w);
  EXPECT_EQ(ts[0].dtype, DType::U8);
  EXPECT_EQ(ts[0].shape, (Shape{64 * 96 / 2, 1}));
  EXPECT_EQ(ts[1].name, w + ".absmax");
  EXPECT_EQ(ts[1].dtype, DType::U8);
  EXPECT_EQ(ts[1].shape, (Shape{96}));
  EXPECT_EQ(ts[2].name, w + ".quant_map");
  EXPECT_EQ(ts[2].shape, (Shape{16}));
  EXPECT_EQ(ts[3].name, w + ".nested_absmax");
  EXPECT_EQ(ts[3].shape, (Shape{1}));
  EXPECT_EQ(ts[4].name, w + ".nested_quant_map");
  EXPECT_EQ(ts[4].shape, (Shape{256}));
  EXPECT_EQ(ts[5].name, w + ".quant_state.bitsandbytes__nf4");
  const std::string json(ts[5].bytes.begin(), ts[5].bytes.end());
  EXPECT_EQ(json.rfind("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 96], "
                       "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ",
                       0),
            0u)
      << json;
  // The specs known before quantizing agree with the tensors written after.
  const auto specs = bnb_tensor_specs_before_state(w, {64, 96}, Quant4Type::NF4, 64, true);
  ASSERT_EQ(specs.size(), 5u);
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(specs[i].name, ts[i].name);
    EXPECT_EQ(specs[i].nbytes(), ts[i].bytes.size());
  }
}

void round_trip(Quant4Type t, bool dq, int64_t block) {
  ScratchDir dir;
  const auto x = testing::randn(int64_t(33 * 77), unsigned(block), 0.02f);  // odd element count
  const Quant4Tensor q = quantize_tensor(x.data(), {33, 77}, t, block, dq);
  auto ts = bnb_tensors("w", q, DType::F16);
  ts.push_back({"other", DType::F32, {2}, std::vector<uint8_t>(8, 0)});
  save_safetensors(dir / "m.safetensors", ts);
  const SafetensorsModel m(dir / "m.safetensors");
  EXPECT_EQ(bnb_quantized_weights(m), std::vector<std::string>{"w"});
  EXPECT_TRUE(is_bnb_companion("w.absmax"));
  EXPECT_FALSE(is_bnb_companion("other"));
  const BnbQuantState st = check_bnb_weight(m, "w");  // what inspect reads, without copying
  EXPECT_EQ(st.shape, (Shape{33, 77}));
  EXPECT_EQ(st.nested, dq);
  DType dt = DType::F32;
  const Quant4Tensor back = load_bnb_weight(m, "w", &dt);
  EXPECT_EQ(dt, DType::F16);
  EXPECT_EQ(back.type, t);
  EXPECT_EQ(back.block, block);
  EXPECT_EQ(back.shape, (Shape{33, 77}));
  EXPECT_EQ(back.codes, q.codes);
  EXPECT_EQ(back.block_scales(), q.block_scales());
  std::vector<float> y1(x.size()), y2(x.size());
  dequantize_tensor(q, y1.data());
  dequantize_tensor(back, y2.data());
  EXPECT_EQ(y1, y2);
}

TEST(BnbLayout, RoundTripNf4DoubleQuant) { round_trip(Quant4Type::NF4, true, 64); }
TEST(BnbLayout, RoundTripNf4Plain) { round_trip(Quant4Type::NF4, false, 128); }
TEST(BnbLayout, RoundTripFp4DoubleQuant) { round_trip(Quant4Type::FP4, true, 32); }
TEST(BnbLayout, RoundTripFp4Plain) { round_trip(Quant4Type::FP4, false, 4096); }

// Writes the tensors of one quantized weight with `edit` applied, then loads.
std::string load_error(const std::function<void(std::vector<OwnedTensor>&)>& edit) {
  ScratchDir dir;
  const auto x = testing::randn(int64_t(64 * 64), 3, 0.02f);
  auto ts = bnb_tensors("w", quantize_tensor(x.data(), {64, 64}, Quant4Type::NF4, 64, true), DType::BF16);
  edit(ts);
  save_safetensors(dir / "m.safetensors", ts);
  try {
    const SafetensorsModel m(dir / "m.safetensors");
    load_bnb_weight(m, "w");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(BnbLayout, RefusesBrokenCompanions) {
  auto find = [](std::vector<OwnedTensor>& ts, const std::string& n) -> OwnedTensor& {
    for (auto& t : ts)
      if (t.name == n) return t;
    throw std::runtime_error("no " + n);
  };
  EXPECT_NE(load_error([&](auto& ts) { std::erase_if(ts, [](auto& t) { return t.name == "w.absmax"; }); })
                .find("w.absmax is missing"),
            std::string::npos);
  EXPECT_NE(load_error([&](auto& ts) {
              auto& t = find(ts, "w.nested_absmax");
              t.dtype = DType::U8;
              t.shape = {4};
            }).find("has dtype U8, expected F32"),
            std::string::npos);
  EXPECT_NE(load_error([&](auto& ts) {
              auto& t = find(ts, "w");
              t.shape = {100, 1};
              t.bytes.resize(100);
            }).find("expected 2048"),
            std::string::npos);
  EXPECT_NE(load_error([&](auto& ts) {
              auto& t = find(ts, "w.quant_state.bitsandbytes__nf4");
              t.bytes = {'{', 'x'};
              t.shape = {2};
            }).find("not valid JSON"),
            std::string::npos);
  EXPECT_NE(load_error([&](auto& ts) {
              auto& t = find(ts, "w.quant_map");
              float v = 0.5f;
              std::memcpy(t.bytes.data(), &v, 4);
            }).find("not the standard nf4 code book"),
            std::string::npos);
}

TEST(BnbLayout, QuantStateParsing) {
  auto parse = [](const std::string& s) {
    return parse_bnb_quant_state(std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size()),
                                 "t");
  };
  const auto st = parse(
      "{\"quant_type\": \"fp4\", \"blocksize\": 128, \"dtype\": \"float16\", \"shape\": [3, 5], "
      "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.25}");
  EXPECT_EQ(st.type, Quant4Type::FP4);
  EXPECT_EQ(st.block, 128);
  EXPECT_EQ(st.dtype, DType::F16);
  EXPECT_EQ(st.shape, (Shape{3, 5}));
  EXPECT_TRUE(st.nested);
  EXPECT_EQ(st.nested_offset, 0.25f);
  EXPECT_THROW(parse("{\"quant_type\": \"int4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [1]}"), Error);
  EXPECT_THROW(parse("{\"quant_type\": \"nf4\", \"blocksize\": 48, \"dtype\": \"bfloat16\", \"shape\": [1]}"), Error);
  EXPECT_THROW(parse("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"int8\", \"shape\": [1]}"), Error);
  EXPECT_THROW(parse("{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [-1]}"), Error);
  EXPECT_THROW(parse("[]"), Error);
}

}  // namespace
}  // namespace qlora
