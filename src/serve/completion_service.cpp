#include "serve/completion_service.h"

#include "core/error.h"
#include "train/sample_text.h"

namespace qlora {

CompletionService::CompletionService(const ServedModels& models, const ServiceLimits& limits)
    : models_(models), limits_(limits), admission_(limits.generators, limits.queue) {
  if (limits.context < 2 || limits.context > models.config().max_position_embeddings)
    fail("context of ", limits.context, " tokens: expected 2..", models.config().max_position_embeddings,
         " (the model's max_position_embeddings)");
  if (limits.max_tokens < 1 || limits.max_tokens >= limits.context)
    fail("max tokens ", limits.max_tokens, ": expected 1..", limits.context - 1, " (below the context)");
  // Every generator allocated once, for the whole context and the largest adapter rank.
  for (int i = 0; i < limits.generators; ++i)
    generators_.push_back(
        std::make_unique<LlamaGenerator>(models.base(), nullptr, limits.context, models.max_rank()));
}

PreparedCompletion CompletionService::prepare(const CompletionRequest& r) const {
  PreparedCompletion p;
  p.request = r;
  if (!models_.has(r.model)) throw model_not_found(r.model);
  p.lora = models_.adapter(r.model);
  const Tokenizer& tok = models_.tokenizer();
  const bool chat = r.endpoint == Endpoint::chat;
  try {
    if (chat) {
      if (!models_.chat_template())
        throw invalid_request("this model has no chat template (" + models_.chat_template_error() +
                                  "); use /v1/completions, or start the server with --chat-template",
                              "messages");
      p.prompt = chat_prompt_ids(tok, *models_.chat_template(), r.messages);
    } else {
      p.prompt = tok.encode(r.prompt, true);
    }
  } catch (const Error& e) {
    throw invalid_request(std::string("cannot render the prompt: ") + e.what(), chat ? "messages" : "prompt");
  }
  if (p.prompt.empty()) throw invalid_request("the prompt encodes to no token", chat ? "messages" : "prompt");
  const int64_t max_tokens = r.max_tokens.value_or(limits_.max_tokens);
  if (max_tokens > limits_.max_tokens)
    throw invalid_request("max_tokens " + std::to_string(max_tokens) + " exceeds this server's limit of " +
                              std::to_string(limits_.max_tokens) + " (qlora serve --max-tokens)",
                          "max_tokens", "max_tokens_exceeded");
  const int64_t n = int64_t(p.prompt.size());
  if (n + max_tokens > limits_.context)
    throw invalid_request("This model's maximum context length is " + std::to_string(limits_.context) +
                              " tokens. However, you requested " + std::to_string(n + max_tokens) +
                              " tokens (" + std::to_string(n) + " in the prompt, " +
                              std::to_string(max_tokens) +
                              " for the completion). Please reduce the prompt or max_tokens.",
                          chat ? "messages" : "prompt", "context_length_exceeded");
  p.settings.max_new_tokens = max_tokens;
  p.settings.sampling = {r.temperature, r.top_p};
  p.settings.seed = r.seed;
  p.settings.chat = chat;
  p.eos = end_of_sequence_ids(models_.config(), &tok, chat);
  return p;
}

CompletionResult CompletionService::run(Admission::Ticket& ticket, const PreparedCompletion& p,
                                        const std::function<bool(const std::string&)>& on_text) {
  const auto slot = ticket.acquire();
  if (!slot) throw ApiError(503, "server_error", "the server is shutting down", "", "shutting_down");
  LlamaGenerator& gen = *generators_[size_t(*slot)];
  gen.set_lora(p.lora);
  ReplyText reply(models_.tokenizer(), p.request.stop);
  bool client_gone = false;
  auto on_token = [&](int32_t id) {
    const std::string piece = reply.push(id);
    if (on_text && !piece.empty() && !on_text(sanitize_utf8(piece))) {
      client_gone = true;
      return false;
    }
    return !reply.stopped();
  };
  const GeneratedTokens g = generate_tokens(gen, models_.config().vocab_size, p.prompt, p.eos, p.settings,
                                            on_token, [&] { return reply.stopped(); });
  const std::string rest = reply.finish();
  if (on_text && !client_gone && !rest.empty()) on_text(sanitize_utf8(rest));
  CompletionResult out;
  out.text = sanitize_utf8(reply.text());
  out.finish = g.finish;
  out.usage = {int64_t(p.prompt.size()), int64_t(g.ids.size())};
  return out;
}

}  // namespace qlora
