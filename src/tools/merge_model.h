// `qlora merge`: a base model + a PEFT LoRA adapter -> one plain Hugging Face
// folder, or one GGUF file that llama.cpp and Ollama run, whose adapted
// linears are W' = W + scale * B A (scale = alpha/r, or alpha/sqrt(r) with
// use_rslora).
//
// W is the model folder's own 16/32-bit weight, or, for a bitsandbytes 4-bit
// checkpoint, its dequantized NF4/FP4 value (fp32, as the trainer saw it).
// W' is computed in fp32 and rounded once to the output dtype; every other
// tensor is converted to the output dtype (copied byte for byte when it is
// already stored in it). Streams tensor by tensor, chunk by chunk: memory is
// one chunk of fp32 values plus, for a 4-bit source, one tensor's codes.
//
// GGUF output (tools/gguf_metadata.h for the metadata): llama.cpp's tensor
// names, q/k rows interleaved for "llama"-architecture models (the order
// llama.cpp's converter stores), 1-D tensors (norms, biases) F32, the rest in
// the output dtype or Q8_0; Llama 3 RoPE scaling as the rope_freqs.weight
// tensor; the tokenizer converted from tokenizer.json / tokenizer.model, or
// copied from a GGUF base. One file written through GgufWriter (a temporary
// name renamed into place), no shards.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"

namespace qlora {

enum class MergeFormat { HfFolder, Gguf };

struct MergeOptions {
  MergeFormat format = MergeFormat::HfFolder;
  DType dtype = DType::BF16;  // F32, F16 or BF16
  // GGUF only: 2-D weights as Q8_0 (dtype is then unused). A weight whose
  // rows are not a whole number of 32-value blocks is written as F16.
  bool q8_0 = false;
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
  std::vector<std::string> q8_0_fallbacks;  // GGUF q8_0: tensors written as F16 instead
};

// Errors (qlora::Error, nothing left at `output`): output exists without
// overwrite, or is the model or adapter folder; missing files; an adapter for
// another architecture or shape (LoraWeights::load_peft); an unsupported dtype;
// q8_0 without GGUF; a tokenizer llama.cpp's GGUF cannot describe (GGUF).
MergeReport merge_model(const std::filesystem::path& model, const std::filesystem::path& adapter,
                        const std::filesystem::path& output, const MergeOptions& opt);

// "bf16" | "f16" | "f32" (and torch's "bfloat16" | "float16" | "float32").
DType merge_dtype_from_name(std::string_view name);
// "hf" | "gguf".
MergeFormat merge_format_from_name(std::string_view name);
// Sets opt.dtype / opt.q8_0 from "bf16" | "f16" | "f32" | "q8_0" (GGUF only).
void set_merge_dtype(MergeOptions& opt, std::string_view name);

}  // namespace qlora
