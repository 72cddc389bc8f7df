// The trained adapter as a Hugging Face PEFT folder: adapter_config.json +
// adapter_model.safetensors, loadable by PEFT (PeftModel.from_pretrained),
// vLLM, llama.cpp's convert_lora_to_gguf.py and LoraWeights::load_peft.
#pragma once

#include <filesystem>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "io/hf_config.h"
#include "model/lora.h"

namespace qlora {

// The version written as "qlora_version" into checkpoint state (which program made it).
const char* qlora_version();

// adapter_config.json's contents for this adapter (PEFT's LoraConfig fields:
// target_modules sorted, bias "none", inference_mode true, use_dora,
// rank_pattern / alpha_pattern in their own order, ...).
nlohmann::ordered_json peft_adapter_config(const LoraConfig& lc, const std::string& base_model_name_or_path);

// Writes dir/adapter_config.json and dir/adapter_model.safetensors (PEFT
// names, lora_A [r, in], lora_B [out, r], F32 so the round trip is exact,
// "__metadata__": {"format": "pt"} as PEFT writes, plus
// "qlora_base_fingerprint" when base_fingerprint is not empty: the base lock,
// train/base_lock.h; kept out of adapter_config.json because PEFT warns about
// every key its LoraConfig does not know). The folder is built under a
// temporary name and renamed into place; an existing dir is replaced only
// once the new one is complete. Errors name the folder.
void save_peft_adapter(const LoraWeights& lora, const ModelConfig& cfg, const std::filesystem::path& dir,
                       const std::string& base_model_name_or_path, const std::string& base_fingerprint = {});

// The safetensors metadata key of the base fingerprint.
inline constexpr const char* kAdapterFingerprintKey = "qlora_base_fingerprint";

// Reads the PEFT adapter in `dir` (LoraWeights::load_peft: names and shapes
// against cfg) and checks that it fits `like`: the same rank, target modules,
// lora_alpha and use_rslora. Errors name adapter_config.json and both values.
// `like` is not changed, so callers copy the result in only once everything
// else they restore has been checked too.
LoraWeights load_matching_adapter(const std::filesystem::path& dir, const LoraWeights& like, const ModelConfig& cfg);

}  // namespace qlora
