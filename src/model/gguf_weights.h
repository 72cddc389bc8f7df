// A GGUF file as a source of the tensor table's tensors: each expected tensor
// found under its llama.cpp name, checked against the configuration the
// metadata gives, dequantized to fp32 and put back in Hugging Face row order.
// stream_llama_weights, `qlora quantize` and `qlora merge` read GGUF models
// through it, so a GGUF file is a model wherever an HF folder is.
#pragma once

#include <filesystem>
#include <vector>

#include "io/gguf.h"
#include "io/hf_config.h"
#include "model/tensor_table.h"

namespace qlora {

class GgufModel {
 public:
  // Maps the file, reads the configuration and checks every expected tensor
  // is present with its shape and no unexpected one is (rope_freqs.weight is
  // part of the configuration); a dequantizable type is checked here too, so
  // a bad file fails before any value is read. Errors name the file and the
  // tensor (by its GGUF name).
  explicit GgufModel(const std::filesystem::path& file);

  const GgufFile& file() const { return file_; }
  const ModelConfig& config() const { return cfg_; }
  const std::vector<TensorSlot>& slots() const { return slots_; }  // expected_tensors(config())
  const GgufTensorInfo& tensor(size_t slot) const { return *tensors_.at(slot); }

  // Slot i's values as fp32 in HF layout ([out, in] rows, q/k rows in HF
  // order). Non-finite values are an error naming the tensor. Uses every core.
  std::vector<float> read(size_t slot) const;

 private:
  GgufFile file_;
  ModelConfig cfg_;
  std::vector<TensorSlot> slots_;
  std::vector<const GgufTensorInfo*> tensors_;
};

}  // namespace qlora
