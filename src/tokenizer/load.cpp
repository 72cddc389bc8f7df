// Tokenizer::load: picks tokenizer.json over tokenizer.model, reads
// tokenizer_config.json beside it.
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_parse.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/loaders.h"

namespace qlora {

namespace fs = std::filesystem;

namespace tok {

namespace {

// bos_token/eos_token are either a string or an AddedToken object.
std::optional<std::string> token_string(const nlohmann::json& j, const char* key) {
  if (!j.contains(key)) return std::nullopt;
  const auto& v = j.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v.at("content").is_string())
    return v.at("content").get<std::string>();
  return std::nullopt;
}

}  // namespace

TokenizerConfig read_tokenizer_config(const fs::path& dir) {
  const fs::path file = dir / "tokenizer_config.json";
  std::ifstream in(file, std::ios::binary);
  if (!in) return {};
  nlohmann::json j;
  try {
    j = parse_json(in, file.string());
  } catch (const nlohmann::json::exception& e) {
    fail(file.string(), ": malformed JSON: ", e.what());
  }
  return parse_tokenizer_config(j, file.string());
}

TokenizerConfig parse_tokenizer_config(const nlohmann::json& j, const std::string& source) {
  TokenizerConfig c;
  if (!j.is_object()) fail(source, ": expected a JSON object");
  c.bos_token = token_string(j, "bos_token");
  c.eos_token = token_string(j, "eos_token");
  if (j.contains("add_bos_token") && j.at("add_bos_token").is_boolean())
    c.add_bos_token = j.at("add_bos_token").get<bool>();
  if (j.contains("add_eos_token") && j.at("add_eos_token").is_boolean())
    c.add_eos_token = j.at("add_eos_token").get<bool>();
  if (j.contains("chat_template")) {
    const auto& t = j.at("chat_template");
    if (t.is_string()) {
      c.chat_template = t.get<std::string>();
    } else if (t.is_array()) {
      // Named templates: [{"name": "default", "template": "..."}, ...].
      for (const auto& e : t) {
        if (!e.is_object() || !e.contains("template") || !e.at("template").is_string()) continue;
        if (!c.chat_template || e.value("name", "") == "default")
          c.chat_template = e.at("template").get<std::string>();
      }
    }
  }
  return c;
}

}  // namespace tok

std::unique_ptr<Tokenizer> Tokenizer::load(const fs::path& dir_or_file) {
  std::error_code ec;
  // A GGUF model carries its tokenizer in its metadata (tokenizer/gguf_vocab).
  if (is_gguf_file(dir_or_file)) return load_gguf_tokenizer(GgufFile(dir_or_file));
  if (fs::is_regular_file(dir_or_file, ec)) {
    const fs::path dir = dir_or_file.parent_path().empty() ? fs::path(".") : dir_or_file.parent_path();
    auto cfg = tok::read_tokenizer_config(dir);
    if (dir_or_file.extension() == ".json") return tok::load_tokenizer_json(dir_or_file, std::move(cfg));
    return tok::load_sentencepiece(dir_or_file, std::move(cfg));
  }
  if (!fs::is_directory(dir_or_file, ec)) fail(dir_or_file.string(), ": no such tokenizer file or folder");
  auto cfg = tok::read_tokenizer_config(dir_or_file);
  if (fs::exists(dir_or_file / "tokenizer.json", ec))
    return tok::load_tokenizer_json(dir_or_file / "tokenizer.json", std::move(cfg));
  if (fs::exists(dir_or_file / "tokenizer.model", ec))
    return tok::load_sentencepiece(dir_or_file / "tokenizer.model", std::move(cfg));
  fail(dir_or_file.string(), ": no tokenizer.json or tokenizer.model in this folder");
}

}  // namespace qlora
