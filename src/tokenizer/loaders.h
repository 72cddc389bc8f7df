// Internal: the pieces Tokenizer::load (load.cpp) dispatches to.
#pragma once

#include <filesystem>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>

#include "tokenizer/tokenizer.h"

namespace qlora::tok {

// What tokenizer_config.json says about special tokens and chat formatting.
struct TokenizerConfig {
  std::optional<std::string> bos_token, eos_token;
  std::optional<bool> add_bos_token, add_eos_token;
  std::optional<std::string> chat_template;
};

// Reads <dir>/tokenizer_config.json; an empty config if the file is absent.
TokenizerConfig read_tokenizer_config(const std::filesystem::path& dir);

// tokenizer_config.json's content (an object; `source` names it in errors).
TokenizerConfig parse_tokenizer_config(const nlohmann::json& j, const std::string& source);

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::filesystem::path& file, TokenizerConfig config);
// An already parsed tokenizer.json (e.g. made from a GGUF file's metadata).
std::unique_ptr<Tokenizer> load_tokenizer_json(const nlohmann::json& j, const std::string& source,
                                               TokenizerConfig config);
std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& file, TokenizerConfig config);
// A serialized SentencePiece ModelProto (tokenizer.model's bytes).
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_bytes, const std::string& source,
                                              TokenizerConfig config);

}  // namespace qlora::tok
