// Tokenizers of the supported model families, loaded from a model folder:
// tokenizer.json (byte-level BPE with regex pre-tokenization: Llama 3, Qwen2,
// GPT-2, SmolLM; SentencePiece-style BPE with byte fallback and metaspace:
// Llama 2, Mistral), or tokenizer.model through libsentencepiece when a folder
// has no tokenizer.json. Anything else is refused by name.
//
// Thread safety: a loaded Tokenizer is immutable; encode/decode may run on
// many threads at once.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qlora {

using TokenId = int32_t;

// The most tokens a vocabulary may have, and so 1 + the largest token id, in
// every tokenizer format (tokenizer.json, tokenizer.model, GGUF). Real
// vocabularies have at most 262,144 (Gemma 3); 2^22 = 4,194,304 is 16 times
// that, and bounds what a file can make qlora allocate for ids (the dense
// id -> piece tables, an embedding of vocab_size rows) before anything looks
// at the model. A file with more is refused by name (docs/reliability.md).
inline constexpr TokenId kMaxVocabSize = TokenId(1) << 22;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Loads <dir>/tokenizer.json, else <dir>/tokenizer.model (a file path is
  // accepted too). Reads tokenizer_config.json when present (bos/eos,
  // add_bos_token, chat_template). A GGUF file gives the tokenizer its
  // metadata describes (tokenizer/gguf_vocab.h). Errors name the file and the
  // unsupported feature.
  static std::unique_ptr<Tokenizer> load(const std::filesystem::path& dir_or_file);

  // Text -> ids. Added/special tokens present in the text are matched before
  // BPE and never split. add_special: prepend BOS (and append EOS) as the
  // tokenizer's post-processor / config says.
  virtual std::vector<TokenId> encode(std::string_view text, bool add_special) const = 0;
  // Ids -> text; skip_special drops special tokens (BOS, EOS, ...).
  virtual std::string decode(const std::vector<TokenId>& ids, bool skip_special = false) const = 0;
  // The vocabulary entry of one id, as stored (e.g. "▁the", "Ġthe", "<0x0A>").
  virtual std::string piece(TokenId id) const = 0;
  // The id of an exact vocabulary entry or added token, if any.
  virtual std::optional<TokenId> token_id(std::string_view piece) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<TokenId> bos_id() const = 0;
  virtual std::optional<TokenId> eos_id() const = 0;
  virtual bool is_special(TokenId id) const = 0;
  // tokenizer_config.json's chat_template, if any (for template detection).
  virtual std::optional<std::string> chat_template() const = 0;
};

}  // namespace qlora
