// The model `qlora quantize` and `qlora merge` read: an HF folder (safetensors,
// possibly a bitsandbytes 4-bit checkpoint) or a GGUF file, with its tensors
// checked against the tensor table before anything is written. Both tools
// stream from it tensor by tensor and write an HF folder, so a GGUF model
// converts to Hugging Face's layout with either.
#pragma once

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <vector>

#include "core/dtype.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/gguf_weights.h"
#include "model/tensor_table.h"

namespace qlora {

// One tensor's values as stored: a view into a mapped safetensors file
// (released page by page as it is consumed), or a GGUF tensor dequantized to
// fp32 in HF row order and held here.
struct StoredTensor {
  std::span<const uint8_t> bytes;
  DType dtype = DType::F32;
  const SafetensorsFile* file = nullptr;  // null for GGUF
  std::vector<float> owned;
  void release(std::span<const uint8_t> piece) const {
    if (file) file->release(piece);
  }
};

class ModelInput {
 public:
  explicit ModelInput(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  const ModelConfig& config() const { return cfg_; }
  const std::vector<TensorSlot>& slots() const { return slots_; }
  bool is_gguf() const { return gguf_ != nullptr; }
  // null for a GGUF file
  const SafetensorsModel* safetensors() const { return st_.get(); }
  // Slot i is a bitsandbytes 4-bit weight (HF checkpoints only).
  bool is_bnb(size_t i) const { return bnb_.at(i); }

  StoredTensor tensor(size_t i) const;
  uint64_t stored_bytes(size_t i) const;  // in the file
  // config.json as the folder has it, or as the GGUF metadata describes it.
  nlohmann::ordered_json config_json() const;
  // The folder's other files (tokenizer, generation config, licence) copied,
  // or for a GGUF file the ones its metadata describes: tokenizer.json or
  // tokenizer.model, tokenizer_config.json, generation_config.json.
  void write_side_files(const std::filesystem::path& out) const;

 private:
  std::filesystem::path path_;
  ModelConfig cfg_;
  std::vector<TensorSlot> slots_;
  std::unique_ptr<GgufModel> gguf_;
  std::unique_ptr<SafetensorsModel> st_;
  std::vector<bool> bnb_;
};

}  // namespace qlora
