// The metadata of a GGUF model that llama.cpp runs, made from what an HF
// folder (or another GGUF file) says: the inverse of io/gguf_config
// (config.json -> "<arch>.*" keys) and of tokenizer/gguf_vocab (tokenizer.json
// or tokenizer.model -> "tokenizer.*" keys). Key names are llama.cpp's
// (LLM_KV_* in its llama-arch.cpp, gguf-py's constants).
//
// Architectures: Llama and Mistral are written as "llama" (llama.cpp's
// converter labels Mistral so too; its sliding window is not part of the
// "llama" architecture and is dropped), Qwen2 as "qwen2", Qwen3 as "qwen3".
#pragma once

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "io/gguf.h"
#include "io/hf_config.h"

namespace qlora {

using GgufKeyValues = std::vector<std::pair<std::string, GgufValue>>;

// "llama" (Llama, Mistral) or "qwen2": general.architecture and the key prefix.
std::string gguf_architecture(Arch a);

// general.architecture and the "<arch>.*" hyperparameters: context_length,
// embedding_length, feed_forward_length, block_count, attention.head_count(_kv),
// attention.key_length/value_length, attention.layer_norm_rms_epsilon,
// rope.dimension_count, rope.freq_base, vocab_size, and linear RoPE scaling as
// rope.scaling.type/factor. Llama 3 scaling is a tensor (gguf_rope_freqs).
GgufKeyValues gguf_model_metadata(const ModelConfig& cfg);

// general.file_type for a model whose 2-D weights are `t` (gguf-py's
// LlamaFileType: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q8_0 7, MOSTLY_BF16 32).
uint32_t gguf_file_type(GgmlType t);

// Llama 3 RoPE scaling as llama.cpp's converter stores it: the F32 tensor
// rope_freqs.weight of head_dim / 2 per-frequency factors (1 for high
// frequencies, `factor` for low ones, smoothly between). Empty for any other
// scaling.
inline constexpr const char* kGgufRopeFreqsTensor = "rope_freqs.weight";
std::vector<float> gguf_rope_freqs(const ModelConfig& cfg);

// tokenizer.* keys for the tokenizer of an HF model folder, its vocabulary
// padded to cfg.vocab_size ("[PAD<id>]", type UNUSED) as llama.cpp needs one
// token per embedding row:
// - tokenizer.json with a byte-level BPE -> tokenizer.ggml.model "gpt2": tokens
//   by id (added tokens included), token_type (NORMAL, CONTROL for special
//   added tokens, USER_DEFINED for the others), merges, and tokenizer.ggml.pre
//   chosen from the pre-tokenizer (smollm, llama-bpe, qwen2, gpt-2; another is
//   refused by name);
// - else tokenizer.model (SentencePiece) -> "llama": pieces, scores and types
//   through libsentencepiece, add_space_prefix from the model's normalizer;
// and for both: bos/eos/unknown/padding ids (tokenizer_config.json, else
// config.json; further config.json eos ids as eot/eom), add_bos_token /
// add_eos_token (tokenizer_config.json, else the tokenizer.json
// post-processor), tokenizer.chat_template. Errors name the file and what is
// unsupported.
GgufKeyValues gguf_tokenizer_metadata(const std::filesystem::path& model_dir, const ModelConfig& cfg);

// Every tokenizer.* key of a GGUF model, as it is.
GgufKeyValues gguf_tokenizer_metadata(const GgufFile& f);

}  // namespace qlora
