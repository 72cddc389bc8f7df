// What generation needs of a model, whichever backend runs it: append tokens,
// get the logits of the next one. LlamaGenerator (CPU, fp32, KV cache) and
// CudaTokenGenerator (GPU, bf16, model/llama_cuda.h) implement it; the samples
// of `qlora run` and `qlora generate` drive either through this.
#pragma once

#include <cstdint>

namespace qlora {

class TokenGenerator {
 public:
  virtual ~TokenGenerator() = default;
  // Appends T tokens to the sequence and writes the logits (vocab_size, fp32)
  // of the token after them. Throws qlora::Error past capacity() tokens or on
  // a token outside the vocabulary.
  virtual void feed(const int32_t* tokens, int64_t T, float* logits) = 0;
  // Tokens fed so far.
  virtual int64_t length() const = 0;
  // The most tokens the sequence may hold (prompt + generated).
  virtual int64_t capacity() const = 0;
};

}  // namespace qlora
