// The tokenizer files an HF folder of a GGUF model would carry, made from the
// file's tokenizer.ggml.* metadata, so a GGUF model tokenizes through the same
// code (and with the same ids) as the folder transformers would write:
//   tokenizer.ggml.model "gpt2"  -> tokenizer.json: byte-level BPE with the
//       file's merges, its pre-tokenizer chosen by tokenizer.ggml.pre
//       (smollm, llama-bpe, qwen2, gpt-2; others refused by name);
//   tokenizer.ggml.model "llama" -> tokenizer.model: a SentencePiece BPE model
//       (pieces, scores and types, byte fallback), loaded by libsentencepiece;
// token types CONTROL and USER_DEFINED become added tokens (special or not),
// and tokenizer_config.json gets bos/eos, add_bos_token and the chat template
// (tokenizer.chat_template).
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "io/gguf.h"
#include "tokenizer/tokenizer.h"

namespace qlora {

// The Split patterns of Llama 3's and Qwen2's tokenizer.json: what
// tokenizer.ggml.pre llama-bpe and qwen2 stand for (and how tools/gguf_metadata
// recognizes them when writing GGUF).
extern const char* const kLlama3SplitRegex;
extern const char* const kQwen2SplitRegex;

// tokenizer.ggml.token_type values; the numbers are SentencePiece's piece types.
struct GgufTokenType {
  enum : int64_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };
};

struct GgufTokenizerFiles {
  nlohmann::json tokenizer_config;  // tokenizer_config.json
  nlohmann::json tokenizer_json;    // tokenizer.json ("gpt2"), else null
  std::string spm_model;            // tokenizer.model bytes ("llama"), else empty
};

// Errors name the file and the key (a missing tokenizer.ggml.tokens, an
// unsupported tokenizer.ggml.model or tokenizer.ggml.pre, lengths that disagree).
GgufTokenizerFiles gguf_tokenizer_files(const GgufFile& f);

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const GgufFile& f);

}  // namespace qlora
