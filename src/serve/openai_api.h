// The OpenAI API's shapes, as `qlora serve` speaks them: request bodies of
// /v1/chat/completions and /v1/completions parsed and checked into a
// CompletionRequest, responses, streamed chunks and error bodies as JSON.
// Pure functions (no sockets), so every rule has a unit test.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "data/chat_template.h"

namespace qlora {

// An error a client gets: an HTTP status and OpenAI's error object
// {"error": {"message", "type", "param", "code"}}.
struct ApiError : std::runtime_error {
  ApiError(int status_, std::string type_, std::string message, std::string param_ = {},
           std::string code_ = {})
      : std::runtime_error(message),
        status(status_),
        type(std::move(type_)),
        param(std::move(param_)),
        code(std::move(code_)) {}
  int status;
  std::string type, param, code;  // param/code empty -> null
};
nlohmann::json error_body(const ApiError& e);

// The common ones.
ApiError invalid_request(std::string message, std::string param = {}, std::string code = {});  // 400
ApiError model_not_found(const std::string& model);                                            // 404

enum class Endpoint { chat, completion };

struct CompletionRequest {
  Endpoint endpoint = Endpoint::chat;
  std::string model;
  Conversation messages;                   // chat: system/user/assistant turns, ending with a user turn
  std::string prompt;                      // completion
  std::optional<int64_t> max_tokens;       // absent: the server's default
  float temperature = 1.0f, top_p = 1.0f;  // OpenAI's defaults
  uint64_t seed = 0;              // absent: 0, so an answer is reproducible unless the client varies it
  std::vector<std::string> stop;  // up to 4, as OpenAI allows
  bool stream = false, include_usage = false;
};

// Parses a request body. Throws ApiError (400, naming the parameter) on bad
// JSON, a missing or mistyped field, or a value out of range; fields the
// server does not implement and that would change the answer (n > 1, tools,
// logprobs, ...) are refused rather than ignored.
CompletionRequest parse_completion_request(std::string_view body, Endpoint endpoint);

struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

// The response of a finished request.
nlohmann::json completion_response(const CompletionRequest& r, const std::string& id, int64_t created,
                                   const std::string& text, const std::string& finish_reason,
                                   const Usage& usage, const std::string& system_fingerprint);
// One streamed chunk: `text` as the delta (chat: with the assistant role on
// the first chunk), or finish_reason set on the last; usage only in the extra
// chunk stream_options.include_usage asks for (empty choices).
nlohmann::json completion_chunk(const CompletionRequest& r, const std::string& id, int64_t created,
                                const std::string& text, const std::optional<std::string>& finish_reason,
                                bool first, const std::string& system_fingerprint);
nlohmann::json usage_chunk(const CompletionRequest& r, const std::string& id, int64_t created,
                           const Usage& usage, const std::string& system_fingerprint);
// "data: <json>\n\n": one server-sent event.
std::string sse_event(const nlohmann::json& j);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

// JSON text for the wire: invalid UTF-8 (a model may emit any bytes) becomes U+FFFD.
std::string json_text(const nlohmann::json& j);

}  // namespace qlora
