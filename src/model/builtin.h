// Built-in demo models, so a fresh machine can run every command without a
// download: "builtin:tiny" is a small random Llama (grouped-query attention,
// untied lm_head) written as a Hugging Face folder (config.json +
// model.safetensors, BF16) from a fixed seed, with a byte-level BPE tokenizer
// (tokenizer.json, tokenizer_config.json, special_tokens_map.json: <pad> 0,
// <s> 1 = BOS, </s> 2 = EOS, 256 bytes, 253 merges learned from the demo data
// recipes/data/legal-qa.jsonl) so `qlora run recipes/demo.yaml` works offline.
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

bool is_builtin_model(std::string_view spec);    // starts with "builtin:"
std::vector<std::string> builtin_model_names();  // {"tiny"}

// Writes the named built-in model into dest (an AtomicDir: complete or absent).
void write_builtin_model(std::string_view name, const std::filesystem::path& dest);

// A model argument as given on the command line: "builtin:NAME" is written
// once into the cache folder ($QLORA_CACHE, else $XDG_CACHE_HOME/qlora, else
// ~/.cache/qlora) under a versioned name (builtin/tiny-v2) and that folder is
// returned; anything else is returned as is.
std::filesystem::path resolve_model_path(const std::string& spec);

}  // namespace qlora
