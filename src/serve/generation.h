// One generation, as `qlora generate`, `qlora chat` and `qlora serve` all run
// it: feed the prompt, then sample token by token until an end-of-sequence
// id, a stop string or the token limit. Whatever the front end, the same
// prompt, settings and seed give the same tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "io/hf_config.h"
#include "model/llama_generate.h"
#include "model/token_generator.h"
#include "tokenizer/tokenizer.h"

namespace qlora {

struct GenerationSettings {
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;  // temperature 0 = greedy
  uint64_t seed = 0;         // the sampler's std::mt19937_64 seed, fresh per generation
  bool ignore_eos = false;
  // A chat reply ends at the end of the turn and leaves the end-of-sequence
  // id out; plain generation keeps it (it then decodes to nothing).
  bool chat = false;
};

enum class FinishReason { stop, length, cancelled };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "cancelled"

struct GeneratedTokens {
  std::vector<int32_t> ids;
  FinishReason finish = FinishReason::length;
};

// The ids that end a generation: the model's eos_token_ids, and in a chat the
// tokenizer's EOS too (the end-of-turn token a template closes replies with).
std::vector<int64_t> end_of_sequence_ids(const ModelConfig& cfg, const Tokenizer* tok, bool chat);

// Feeds `prompt` to a fresh `gen` and samples up to s.max_new_tokens ids.
// on_token sees each kept id as it is sampled; returning false stops the
// generation there (FinishReason::cancelled unless the callback asked for a
// stop via `stopped`). gen must hold prompt + max_new_tokens tokens.
using TokenCallback = std::function<bool(int32_t id)>;
GeneratedTokens generate_tokens(TokenGenerator& gen, int64_t vocab_size, const std::vector<int32_t>& prompt,
                                const std::vector<int64_t>& eos, const GenerationSettings& s,
                                const TokenCallback& on_token = {},
                                const std::function<bool()>& stopped = {});

// The text of a reply as it grows, token by token, for streaming: what is
// safe to show now, with OpenAI-style stop strings cut off. Text is held back
// while it could still become a stop string or ends inside a UTF-8 sequence;
// a tokenizer whose decoding of a longer sequence does not extend the shorter
// one's text (rare) shows the rest only at finish().
class ReplyText {
 public:
  ReplyText(const Tokenizer& tok, std::vector<std::string> stops);
  // Adds one generated id; returns the newly shown text (often empty).
  std::string push(int32_t id);
  // True once the text holds a stop string: the generation should end.
  bool stopped() const { return stopped_; }
  // The text not yet shown; after this, text() is complete.
  std::string finish();
  // The whole reply (stop string and what follows removed).
  const std::string& text() const { return text_; }

 private:
  const Tokenizer& tok_;
  std::vector<std::string> stops_;
  std::vector<int32_t> ids_;
  std::string text_;
  size_t shown_ = 0;
  bool stopped_ = false, diverged_ = false;
};

// `s` with every ill-formed UTF-8 subsequence replaced by U+FFFD, one per
// maximal subpart (Unicode's recommended practice, as Python's
// decode(errors="replace") does): decoded bytes of a model may be any bytes,
// JSON text must be UTF-8.
std::string sanitize_utf8(const std::string& s);

}  // namespace qlora
