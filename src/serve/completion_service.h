// The work behind the endpoints, without HTTP: a parsed CompletionRequest ->
// prompt ids (checked against the limits) -> a generation on one of the
// preallocated generators -> text, streamed piece by piece if asked.
// Requests for different adapters are not batched together: each generator
// runs one sequence at a time with the adapter its request names, and
// `generators` of them run in parallel (each on all cores, OpenMP).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/llama_generate.h"
#include "serve/admission.h"
#include "serve/generation.h"
#include "serve/openai_api.h"
#include "serve/served_models.h"

namespace qlora {

struct ServiceLimits {
  int64_t context = 2048;    // tokens a generator holds: prompt + reply
  int64_t max_tokens = 256;  // the default and the most one request may ask for
  int generators = 1;        // concurrent generations
  int queue = 32;            // requests waiting beyond those
};

// A request checked and tokenized, ready to run.
struct PreparedCompletion {
  CompletionRequest request;
  const LoraWeights* lora = nullptr;
  std::vector<int32_t> prompt;
  std::vector<int64_t> eos;
  GenerationSettings settings;
};

struct CompletionResult {
  std::string text;  // valid UTF-8
  FinishReason finish = FinishReason::length;
  Usage usage;
};

class CompletionService {
 public:
  CompletionService(const ServedModels& models, const ServiceLimits& limits);

  // Throws ApiError: unknown model (404), a chat with no template (400), a
  // conversation the template refuses (400), prompt + max_tokens beyond the
  // context or max_tokens beyond the limit (400, context_length_exceeded /
  // max_tokens).
  PreparedCompletion prepare(const CompletionRequest& r) const;

  // Runs on the calling thread once the ticket has a generator. on_text gets
  // each piece of text as it becomes final (streaming); returning false stops
  // the generation (the client left). Exactly the tokens `qlora generate`
  // gives for the same prompt and settings.
  CompletionResult run(Admission::Ticket& ticket, const PreparedCompletion& p,
                       const std::function<bool(const std::string&)>& on_text = {});

  Admission& admission() { return admission_; }
  const ServedModels& models() const { return models_; }
  const ServiceLimits& limits() const { return limits_; }

 private:
  const ServedModels& models_;
  ServiceLimits limits_;
  Admission admission_;
  std::vector<std::unique_ptr<LlamaGenerator>> generators_;
};

}  // namespace qlora
