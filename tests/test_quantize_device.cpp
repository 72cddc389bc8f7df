// `qlora quantize --device auto|cpu|cuda`: where the 4-bit quantization runs
// changes nothing in the output, byte for byte.
//
// No tolerance anywhere: the GPU path feeds the same fp32 values in the same
// chunks (whole blocks) to kernels that equal the CPU quantizer bit for bit
// (tests/test_cuda_quant.cpp explains why), and everything else (double
// quantization, the quant state JSON, the header, the kept BF16 tensors) is
// the CPU's own code. So every file of the output folder must be identical.
//
// Here (no GPU needed): `cpu` and `automatic` write what the default path
// writes; `cuda` without a usable GPU fails with the reason before the output
// folder is touched. On a GPU (skipped otherwise): the GPU output equals the
// CPU output on builtin:tiny in several settings, on a folder of F32/F16/BF16
// tensors with odd shapes and special values, and on tensors longer than one
// 16M-value chunk; the chunk pipeline itself equals quantize4_ref for chunk
// counts that wrap its two staging slots several times.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "cuda_testing.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/builtin.h"
#include "model/tensor_table.h"
#include "quant/blockwise.h"
#include "testing.h"
#include "tools/quantize_gpu.h"
#include "tools/quantize_model.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::ScratchDir;

// ---- helpers ----------------------------------------------------------------------

// Every regular file of a folder: name -> contents.
std::map<std::string, std::string> folder_files(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) files[e.path().filename().string()] = testing::read_bytes(e.path());
  return files;
}

// Same file names, same bytes; a difference names the file and its first differing byte.
void expect_same_folder(const fs::path& want, const fs::path& got) {
  const auto a = folder_files(want), b = folder_files(got);
  ASSERT_FALSE(a.empty()) << want;
  std::vector<std::string> names_a, names_b;
  for (const auto& [n, bytes] : a) names_a.push_back(n);
  for (const auto& [n, bytes] : b) names_b.push_back(n);
  ASSERT_EQ(names_a, names_b) << want << " vs " << got;
  for (const auto& [name, bytes] : a) {
    const std::string& other = b.at(name);
    if (bytes == other) continue;
    size_t i = 0;
    while (i < bytes.size() && i < other.size() && bytes[i] == other[i]) ++i;
    ADD_FAILURE() << name << " differs: " << bytes.size() << " vs " << other.size()
                  << " bytes, first difference at byte " << i << " (" << want << " vs " << got << ")";
  }
}

bool no_temporary_left(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp-") != std::string::npos) return false;
  return true;
}

QuantizeOptions on(QuantDevice d, QuantizeOptions o = {}) {
  o.device = d;
  return o;
}

// An HF folder for a llama config: every tensor of the table, N(0, 0.02)
// values stored as dtype_of(name, index). With `special`, each tensor starts
// with an all-zero block of 64 values followed by NaN, -0.0, a subnormal of
// its dtype and a large value (where the tensor is long enough).
void write_model(const fs::path& dir, const std::string& config_json,
                 const std::function<DType(const std::string&, size_t)>& dtype_of, bool special) {
  fs::create_directories(dir);
  testing::write_bytes(dir / "config.json", config_json);
  const ModelConfig cfg = load_model_config(dir);
  std::vector<TensorSpec> specs;
  for (const TensorSlot& s : expected_tensors(cfg))
    specs.push_back({s.name, dtype_of(s.name, specs.size()), s.shape});
  SafetensorsWriter w(dir / "model.safetensors", specs);
  std::mt19937 rng(11);
  std::normal_distribution<float> d(0.0f, 0.02f);
  for (const TensorSpec& s : specs) {
    const size_t n = size_t(shape_numel(s.shape));
    std::vector<float> x(n);
    for (auto& v : x) v = d(rng);
    if (special) {
      for (size_t i = 0; i < std::min<size_t>(n, 64); ++i) x[i] = 0.0f;
      const float subnormal = s.dtype == DType::F16 ? 3.0e-6f : 1.0e-39f;
      const float extra[] = {std::numeric_limits<float>::quiet_NaN(), -0.0f, subnormal, 100.0f};
      for (size_t k = 0; k < 4 && 70 + k < n; ++k) x[70 + k] = extra[k];
    }
    std::vector<uint8_t> bytes(n * dtype_size(s.dtype));
    convert_from_f32(x.data(), n, s.dtype, bytes.data());
    w.write(bytes.data(), bytes.size());
  }
  w.commit();
}

DType rotating_dtype(const std::string&, size_t index) {
  constexpr DType kTypes[] = {DType::F32, DType::F16, DType::BF16};
  return kTypes[index % 3];
}

// Odd everything: 99 = 3 heads of 33, 45 intermediate, so every linear weight
// has an odd number of values (a half-filled last code byte) and a short last block.
const char* kOddConfig =
    R"({"model_type": "llama", "vocab_size": 77, "hidden_size": 99, "intermediate_size": 45,
        "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
        "torch_dtype": "float32"})";

// ---- here: cpu and automatic are the default path ---------------------------------

TEST(QuantizeDevice, CpuAndAutoWriteWhatTheDefaultWrites) {
  ScratchDir dir;
  write_builtin_model("tiny", dir / "tiny");
  write_model(dir / "odd", kOddConfig, rotating_dtype, true);
  const bool gpu = !gpu_quantize_unavailable_reason().has_value();
  for (const char* model : {"tiny", "odd"}) {
    SCOPED_TRACE(model);
    const fs::path in = dir / model;
    const fs::path base = dir / (std::string(model) + "-cpu");
    const QuantizeReport cpu = quantize_model(in, base, on(QuantDevice::cpu));
    EXPECT_EQ(cpu.device, QuantDevice::cpu);
    EXPECT_EQ(cpu.device_name, "CPU");
    // The default options are `automatic`.
    EXPECT_EQ(QuantizeOptions{}.device, QuantDevice::automatic);
    const QuantizeReport def = quantize_model(in, dir / (std::string(model) + "-default"), {});
    EXPECT_EQ(def.device, gpu ? QuantDevice::cuda : QuantDevice::cpu) << def.device_note;
    expect_same_folder(base, dir / (std::string(model) + "-default"));
    // The command line, without --device and with each value but cuda.
    for (const char* flag : {"", " --device cpu", " --device auto"}) {
      SCOPED_TRACE(flag);
      const fs::path out = dir / (std::string(model) + "-cli");
      const testing::CliResult r =
          testing::run_qlora("quantize '" + in.string() + "' -o '" + out.string() + "' --no-progress" + flag);
      ASSERT_EQ(r.status, 0) << r.output;
      const bool on_gpu = gpu && std::string(flag) != " --device cpu";
      EXPECT_NE(r.output.find(on_gpu ? "(GPU " : " on CPU"), std::string::npos) << r.output;
      expect_same_folder(base, out);
      fs::remove_all(out);
    }
  }
  EXPECT_TRUE(no_temporary_left(dir.path()));
}

// ---- here: cuda without a GPU is refused before anything is written ---------------

TEST(QuantizeDevice, CudaWithoutAGpuFailsBeforeTouchingTheOutput) {
  const auto why = gpu_quantize_unavailable_reason();
  if (!why) GTEST_SKIP() << "a GPU is usable here: --device cuda succeeds (GPU tests below)";
  ScratchDir dir;
  write_builtin_model("tiny", dir / "hf");
  const std::string expected = "--device cuda: " + *why;

  // Library: the message is the reason; no folder, no temporary.
  EXPECT_EQ(error_of([&] { quantize_model(dir / "hf", dir / "out", on(QuantDevice::cuda)); }), expected);
  EXPECT_FALSE(fs::exists(dir / "out"));
  // Even with force, an existing folder is left as it was.
  fs::create_directories(dir / "taken");
  testing::write_bytes(dir / "taken" / "keep.txt", "x");
  QuantizeOptions force = on(QuantDevice::cuda);
  force.force = true;
  EXPECT_EQ(error_of([&] { quantize_model(dir / "hf", dir / "taken", force); }), expected);
  EXPECT_EQ(testing::read_bytes(dir / "taken" / "keep.txt"), "x");

  // Command line: exit status 1, the same message.
  const testing::CliResult r = testing::run_qlora("quantize '" + (dir / "hf").string() + "' -o '" +
                                                  (dir / "cli").string() + "' --device cuda --no-progress");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_NE(r.output.find("qlora: error: " + expected), std::string::npos) << r.output;
#if !QLORA_HAVE_CUDA
  EXPECT_NE(r.output.find("this build has no CUDA backend"), std::string::npos) << r.output;
#endif
  EXPECT_FALSE(fs::exists(dir / "cli"));
  EXPECT_TRUE(no_temporary_left(dir.path()));
}

TEST(QuantizeDevice, UnknownDeviceIsAUsageError) {
  ScratchDir dir;
  const testing::CliResult r = testing::run_qlora("quantize '" + (dir / "hf").string() + "' -o '" +
                                                  (dir / "o").string() + "' --device tpu");
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("tpu"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "o"));
}

TEST(QuantizeDevice, GpuQuantizerRefusesChunksThatSplitBlocks) {
  // Validated before any device is touched (or refused outright without CUDA).
  const std::string e = error_of([] { GpuQuantizer q(Quant4Type::NF4, 64, 1000, 100); });
#if QLORA_HAVE_CUDA
  EXPECT_NE(e.find("not a positive multiple of the block size 64"), std::string::npos) << e;
#else
  EXPECT_NE(e.find("this build has no CUDA backend"), std::string::npos) << e;
#endif
}

// ---- on a GPU: the GPU writes the CPU's bytes --------------------------------------

// Quantizes `in` on both devices with `o` and compares the folders.
void expect_gpu_equals_cpu(const fs::path& in, const fs::path& scratch, const std::string& tag,
                           QuantizeOptions o) {
  SCOPED_TRACE(tag);
  const fs::path cpu = scratch / (tag + "-cpu"), gpu = scratch / (tag + "-gpu");
  quantize_model(in, cpu, on(QuantDevice::cpu, o));
  const QuantizeReport r = quantize_model(in, gpu, on(QuantDevice::cuda, o));
  EXPECT_EQ(r.device, QuantDevice::cuda);
  EXPECT_NE(r.device_name.find("(GPU "), std::string::npos) << r.device_name;
  expect_same_folder(cpu, gpu);
  fs::remove_all(cpu);
  fs::remove_all(gpu);
}

TEST(QuantizeDevice, GpuWritesTheCpuBytesForBuiltinTinyInEverySetting) {
  QLORA_REQUIRE_GPU();
  ScratchDir dir;
  write_builtin_model("tiny", dir / "hf");
  expect_gpu_equals_cpu(dir / "hf", dir.path(), "default", {});
  QuantizeOptions fp4;
  fp4.type = Quant4Type::FP4;
  fp4.block = 128;
  fp4.double_quant = false;
  expect_gpu_equals_cpu(dir / "hf", dir.path(), "fp4-128-plain", fp4);
  for (int64_t block : {32, 4096}) {
    QuantizeOptions o;
    o.block = block;
    expect_gpu_equals_cpu(dir / "hf", dir.path(), "nf4-" + std::to_string(block), o);
  }
  QuantizeOptions sharded;
  sharded.max_shard_bytes = 64 * 1024;
  expect_gpu_equals_cpu(dir / "hf", dir.path(), "sharded", sharded);

  // The command line says which device ran.
  const testing::CliResult r = testing::run_qlora("quantize '" + (dir / "hf").string() + "' -o '" +
                                                  (dir / "cli").string() + "' --device cuda --no-progress");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("(GPU "), std::string::npos) << r.output;
  quantize_model(dir / "hf", dir / "cli-cpu", on(QuantDevice::cpu));
  expect_same_folder(dir / "cli-cpu", dir / "cli");
}

TEST(QuantizeDevice, GpuWritesTheCpuBytesForF32F16Bf16AndOddShapes) {
  QLORA_REQUIRE_GPU();
  ScratchDir dir;
  write_model(dir / "hf", kOddConfig, rotating_dtype, true);
  expect_gpu_equals_cpu(dir / "hf", dir.path(), "nf4-64", {});
  QuantizeOptions fp4;
  fp4.type = Quant4Type::FP4;
  fp4.block = 32;
  fp4.double_quant = false;
  expect_gpu_equals_cpu(dir / "hf", dir.path(), "fp4-32-plain", fp4);
}

// gate/up/down hold 4097 x 4096 = 2^24 + 4096 values: a full 16M-value chunk
// and a short second one; q/o hold exactly one chunk. Each dtype gets a
// two-chunk tensor. About 250 MB of input.
TEST(QuantizeDevice, GpuWritesTheCpuBytesForTensorsLongerThanOneChunk) {
  QLORA_REQUIRE_GPU();
  ScratchDir dir;
  const char* config =
      R"({"model_type": "llama", "vocab_size": 64, "hidden_size": 4096, "intermediate_size": 4097,
          "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8,
          "torch_dtype": "bfloat16"})";
  const auto dtype_of = [](const std::string& name, size_t index) {
    if (name.find("gate_proj") != std::string::npos || name.find("o_proj") != std::string::npos)
      return DType::F32;
    if (name.find("up_proj") != std::string::npos || name.find("q_proj") != std::string::npos)
      return DType::F16;
    if (name.find("down_proj") != std::string::npos) return DType::BF16;
    return rotating_dtype(name, index);
  };
  write_model(dir / "hf", config, dtype_of, false);
  const ModelConfig cfg = load_model_config(dir / "hf");
  int64_t longest = 0;
  for (const TensorSlot& s : expected_tensors(cfg)) longest = std::max(longest, shape_numel(s.shape));
  ASSERT_GT(longest, kGpuQuantizeChunk);
  expect_gpu_equals_cpu(dir / "hf", dir.path(), "nf4-64", {});
  QuantizeOptions fp4;
  fp4.type = Quant4Type::FP4;
  fp4.block = 4096;
  expect_gpu_equals_cpu(dir / "hf", dir.path(), "fp4-4096", fp4);
}

// The pipeline itself with small chunks, so that one tensor runs through the
// two slots several times: concatenated codes and absmax equal
// quantize4_ref of the fp32 values, for each dtype, block and a length that
// ends in a short chunk of odd length.
TEST(QuantizeDevice, GpuQuantizerChunksEqualTheReference) {
  QLORA_REQUIRE_GPU();
  for (Quant4Type type : {Quant4Type::NF4, Quant4Type::FP4})
    for (int64_t block : {32, 64, 4096}) {
      const int64_t chunk = 3 * block;
      const int64_t longest = 7 * chunk + 2 * block + 17;
      GpuQuantizer gpu(type, block, longest, chunk);
      // One quantizer, tensors of several lengths in a row (as quantize_model uses it).
      for (int64_t n : {int64_t(1), block - 1, chunk, 2 * chunk, longest})
        for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
          SCOPED_TRACE(std::string(quant4_name(type)) + " block " + std::to_string(block) + " n " +
                       std::to_string(n) + " " + std::string(dtype_name(dt)));
          const auto x = testing::randn(n, unsigned(n + block), 0.02f);
          std::vector<uint8_t> stored(size_t(n) * dtype_size(dt));
          convert_from_f32(x.data(), size_t(n), dt, stored.data());
          std::vector<float> widened(static_cast<size_t>(n));
          convert_to_f32(stored.data(), dt, size_t(n), widened.data());
          std::vector<uint8_t> want_codes(size_t(quant4_code_bytes(n)));
          std::vector<float> want_absmax(size_t(quant4_num_blocks(n, block)));
          quantize4_ref(widened.data(), n, block, type, want_codes.data(), want_absmax.data());

          // Poisoned (NaN bits), so an absmax the pipeline never wrote fails.
          std::vector<float> absmax(want_absmax.size());
          std::memset(absmax.data(), 0xff, absmax.size() * sizeof(float));
          std::vector<uint8_t> codes;
          int64_t calls = 0;
          uint64_t consumed = 0;
          gpu.quantize({stored, dt, n, nullptr}, absmax.data(),
                       [&](std::span<const uint8_t> c, uint64_t in_bytes) {
                         codes.insert(codes.end(), c.begin(), c.end());
                         ++calls;
                         consumed += in_bytes;
                       });
          EXPECT_EQ(calls, (n + chunk - 1) / chunk);
          EXPECT_EQ(consumed, stored.size());
          ASSERT_EQ(codes, want_codes);
          ASSERT_EQ(0, std::memcmp(absmax.data(), want_absmax.data(), absmax.size() * sizeof(float)));
        }
    }
}

}  // namespace
}  // namespace qlora
