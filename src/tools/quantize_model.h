// `qlora quantize`: an HF model folder or a GGUF file -> the same model with the linear
// layers of every block in bitsandbytes 4-bit form (quant/bnb_layout.h),
// embeddings, norms and lm_head in BF16, tokenizer and generation files
// copied, and quantization_config in config.json, so that transformers +
// bitsandbytes load it as a "-bnb-4bit" model.
//
// Streams tensor by tensor and chunk by chunk from the memory-mapped input:
// peak memory stays near one chunk plus one tensor's codes, whatever the
// model size. The output folder appears only when complete.
//
// The 4-bit quantization runs on the CPU or on the GPU (src/tools/quantize_gpu.h);
// the output is byte for byte the same either way.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "quant/blockwise.h"

namespace qlora {

// Where the 4-bit quantization runs. automatic: the GPU when one is usable
// (gpu_quantize_unavailable_reason() is nullopt and its staging can be
// allocated), else the CPU, silently: the bytes are the same. cuda: the GPU or
// an error naming why not, raised before the output folder is touched.
enum class QuantDevice : uint8_t { automatic, cpu, cuda };

struct QuantizeOptions {
  // false (`--type none`): every tensor kept in BF16, a plain HF folder (the
  // GGUF -> Hugging Face conversion).
  bool quantize = true;
  Quant4Type type = Quant4Type::NF4;
  int64_t block = kDefaultBlock4;
  bool double_quant = true;
  bool force = false;                     // replace an existing output folder
  uint64_t max_shard_bytes = 5ull << 30;  // as transformers' default max_shard_size "5GB"
  bool progress = false;                  // progress bar on stderr
  QuantDevice device = QuantDevice::automatic;
};

struct QuantizeReport {
  int64_t quantized_tensors = 0, kept_tensors = 0, shards = 0;
  int64_t params = 0, quantized_params = 0;
  uint64_t input_bytes = 0, output_bytes = 0;
  double seconds = 0;
  QuantDevice device = QuantDevice::cpu;  // the one that ran: cpu or cuda
  std::string device_name = "CPU";        // or the GPU's, "NVIDIA H200 (GPU 0)"
  std::string device_note;                // automatic only: why a present GPU was not used (setup failed)
  double bits_per_param() const { return params ? double(output_bytes) * 8 / double(params) : 0; }
};

QuantizeReport quantize_model(const std::filesystem::path& input, const std::filesystem::path& output,
                              const QuantizeOptions& opt);

// The config.json quantization_config block transformers writes for these settings.
std::string bnb_quantization_config_json(const QuantizeOptions& opt);

}  // namespace qlora
