// Internal: the pieces Tokenizer::load (load.cpp) dispatches to.
#pragma once

#include <filesystem>
#include <memory>
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

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::filesystem::path& file, TokenizerConfig config);
std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& file, TokenizerConfig config);

}  // namespace qlora::tok
