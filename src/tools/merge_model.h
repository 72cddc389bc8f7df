// `qlora merge`: a base model + a PEFT LoRA adapter -> one plain Hugging Face
// folder whose adapted linears are W' = W + scale * B A (scale = alpha/r, or
// alpha/sqrt(r) with use_rslora).
//
// W is the model folder's own 16/32-bit weight, or, for a bitsandbytes 4-bit
// checkpoint, its dequantized NF4/FP4 value (fp32, as the trainer saw it).
// W' is computed in fp32 and rounded once to the output dtype; every other
// tensor is converted to the output dtype (copied byte for byte when it is
// already stored in it). Streams tensor by tensor, chunk by chunk: memory is
// one chunk of fp32 values plus, for a 4-bit source, one tensor's codes.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string_view>

#include "core/dtype.h"

namespace qlora {

struct MergeOptions {
  DType dtype = DType::BF16;              // F32, F16 or BF16
  bool overwrite = false;                 // replace an existing output folder
  uint64_t max_shard_bytes = 5ull << 30;  // as quantize (transformers' "5GB")
  bool progress = false;                  // progress bar on stderr
};

struct MergeReport {
  int64_t merged_tensors = 0;  // linears with W + scale * B A
  int64_t copied_tensors = 0;  // everything else
  int64_t shards = 0;
  bool from_4bit = false;  // the base was a bitsandbytes 4-bit checkpoint
  uint64_t output_bytes = 0;
  double seconds = 0;
};

// Errors (qlora::Error, nothing left at `output`): output exists without
// overwrite, or is the model or adapter folder; missing files; an adapter for
// another architecture or shape (LoraWeights::load_peft); an unsupported dtype.
MergeReport merge_model(const std::filesystem::path& model, const std::filesystem::path& adapter,
                        const std::filesystem::path& output, const MergeOptions& opt);

// "bf16" | "f16" | "f32" (and torch's "bfloat16" | "float16" | "float32").
DType merge_dtype_from_name(std::string_view name);

}  // namespace qlora
