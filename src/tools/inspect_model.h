// `qlora inspect`: what a safetensors file, model folder or GGUF file holds —
// architecture, parameter count, every tensor (4-bit weights shown once, with
// their logical shape and the bytes of all their companion tensors), the
// quantization and the bits per parameter.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "io/hf_config.h"
#include "io/safetensors.h"
#include "quant/bnb_layout.h"

namespace qlora {

struct InspectedTensor {
  std::string name;
  std::string dtype;   // safetensors dtype, or "NF4"/"FP4" for a 4-bit weight
  Shape shape;         // logical shape
  uint64_t bytes = 0;  // including a 4-bit weight's companions
  std::optional<BnbQuantState> quant;
  std::string file;  // file name inside the folder
};

struct Inspection {
  std::filesystem::path source;
  std::optional<ModelConfig> config;
  std::vector<InspectedTensor> tensors;  // sorted by name
  int64_t params = 0;
  uint64_t bytes = 0;  // tensor bytes (headers excluded)
  uint64_t file_bytes = 0;
  size_t files = 0;
  int64_t quantized_tensors = 0, quantized_params = 0;
  uint64_t quantized_bytes = 0;       // the 4-bit weights with all their companions
  std::vector<std::string> problems;  // mismatches with config.json's architecture
  std::string gguf_types;             // a GGUF file: "F32 x61, Q4_1 x210, Q8_0 x1"
  double bits_per_param() const { return params ? double(bytes) * 8 / double(params) : 0; }
};

Inspection inspect_model(const std::filesystem::path& file_or_dir);
std::string inspection_text(const Inspection& in);
std::string inspection_json(const Inspection& in);

}  // namespace qlora
