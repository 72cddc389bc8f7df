// `qlora export --format gguf`: a PEFT LoRA adapter (ours or PEFT's) as
// llama.cpp's LoRA adapter GGUF, the file `llama-cli --lora` and Ollama's
// ADAPTER load on top of the base model's GGUF.
//
// The format (llama.cpp: convert_lora_to_gguf.py writes it,
// src/llama-adapter.cpp reads it, llama-graph.cpp's build_lora_mm applies it):
//   general.architecture  the base's ("llama", "qwen2"; must equal the model's)
//   general.type          "adapter"
//   adapter.type          "lora"
//   adapter.lora.alpha    f32; llama.cpp scales by alpha / rank, with rank
//                         read from lora_b's ne[0] (alpha 0 means scale 1)
//   tensors, per adapted linear, named after the base weight:
//     blk.<i>.attn_q.weight.lora_a   ne {in, r}  = PEFT lora_A [r, in]
//     blk.<i>.attn_q.weight.lora_b   ne {r, out} = PEFT lora_B [out, r]
//   (llama.cpp checks base ne[0] == a ne[0], base ne[1] == b ne[1],
//   a ne[1] == b ne[0]). The rows of lora_b are output rows, so for the q and
//   k projections of "llama" models they are interleaved as the base weight's
//   rows are (model/gguf_names.h); lora_a is on the input side and unchanged.
// rsLoRA (PEFT scale alpha / sqrt(r)) is written as alpha' = alpha sqrt(r),
// so llama.cpp's alpha' / r gives the same scale.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "quant/ggml_types.h"

namespace qlora {

struct AdapterExportOptions {
  // The base model (HF folder, GGUF file; builtin:NAME resolved by the
  // caller) for the architecture and head counts. Empty: the adapter's
  // base_model_name_or_path when it names a folder, a file or builtin:NAME.
  std::filesystem::path model;
  GgmlType type = GgmlType::F32;  // F32, F16 or BF16 (the PEFT converter's default is F32)
  bool overwrite = false;         // replace an existing output file
};

struct AdapterExportReport {
  std::filesystem::path model;  // the base used
  std::string architecture;     // general.architecture written
  int64_t tensors = 0;          // lora_a + lora_b
  int64_t rank = 0;
  double alpha = 0;          // adapter_config.json's lora_alpha
  double written_alpha = 0;  // adapter.lora.alpha (alpha sqrt(r) for rsLoRA)
  bool rslora = false;
  uint64_t output_bytes = 0;
};

// Errors (qlora::Error; nothing at `output`): an existing output without
// overwrite; no base found ("pass --model"); an adapter that does not fit the
// base (LoraWeights::load_peft names the tensor); lora_alpha 0 (llama.cpp
// would apply the adapter unscaled); an unsupported type; an unwritable output.
AdapterExportReport export_adapter_gguf(const std::filesystem::path& adapter,
                                        const std::filesystem::path& output, const AdapterExportOptions& opt);

// "f32" | "f16" | "bf16" (and "float32" | "float16" | "bfloat16").
GgmlType adapter_gguf_type_from_name(std::string_view name);

}  // namespace qlora
