// `qlora quantize`: an HF model folder -> the same model with the linear
// layers of every block in bitsandbytes 4-bit form (quant/bnb_layout.h),
// embeddings, norms and lm_head in BF16, tokenizer and generation files
// copied, and quantization_config in config.json, so that transformers +
// bitsandbytes load it as a "-bnb-4bit" model.
//
// Streams tensor by tensor and chunk by chunk from the memory-mapped input:
// peak memory stays near one chunk plus one tensor's codes, whatever the
// model size. The output folder appears only when complete.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>

#include "quant/blockwise.h"

namespace qlora {

struct QuantizeOptions {
  Quant4Type type = Quant4Type::NF4;
  int64_t block = kDefaultBlock4;
  bool double_quant = true;
  bool force = false;                        // replace an existing output folder
  uint64_t max_shard_bytes = 5ull << 30;     // as transformers' default max_shard_size "5GB"
  bool progress = false;                     // progress bar on stderr
};

struct QuantizeReport {
  int64_t quantized_tensors = 0, kept_tensors = 0, shards = 0;
  int64_t params = 0, quantized_params = 0;
  uint64_t input_bytes = 0, output_bytes = 0;
  double seconds = 0;
  double bits_per_param() const { return params ? double(output_bytes) * 8 / double(params) : 0; }
};

QuantizeReport quantize_model(const std::filesystem::path& input, const std::filesystem::path& output,
                              const QuantizeOptions& opt);

// The config.json quantization_config block transformers writes for these settings.
std::string bnb_quantization_config_json(const QuantizeOptions& opt);

}  // namespace qlora
