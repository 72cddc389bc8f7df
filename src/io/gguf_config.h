// A GGUF file's model metadata as the config.json an HF folder would carry.
//
// llama.cpp writes the architecture in general.architecture and its
// hyperparameters under "<arch>.*" keys (llama.block_count, ...). They are
// turned into the config.json object transformers would read, and that object
// goes through the same parse_model_config as a real config.json, so a GGUF
// model meets exactly the checks and defaults of an HF folder, and
// `qlora quantize model.gguf` can write the object out as the folder's
// config.json.
#pragma once

#include <nlohmann/json.hpp>

#include "io/gguf.h"
#include "io/hf_config.h"

namespace qlora {

// Architectures read from GGUF: "llama" (Llama, SmolLM, Mistral GGUFs, which
// llama.cpp also labels llama) and "qwen2". Others are refused by name.
// Errors name the file and the key.
nlohmann::json gguf_config_json(const GgufFile& f);
ModelConfig gguf_model_config(const GgufFile& f);

}  // namespace qlora
