#include "serve/openai_api.h"

#include <cmath>

#include "core/error.h"
#include "core/json_parse.h"
#include "serve/generation.h"

namespace qlora {

using nlohmann::json;

json error_body(const ApiError& e) {
  json err;
  err["message"] = sanitize_utf8(e.what());
  err["type"] = e.type;
  err["param"] = e.param.empty() ? json(nullptr) : json(e.param);
  err["code"] = e.code.empty() ? json(nullptr) : json(e.code);
  return json{{"error", err}};
}

ApiError invalid_request(std::string message, std::string param, std::string code) {
  return ApiError(400, "invalid_request_error", std::move(message), std::move(param), std::move(code));
}

ApiError model_not_found(const std::string& model) {
  return ApiError(404, "invalid_request_error",
                  "The model '" + model + "' does not exist (GET /v1/models lists the base and its adapters)",
                  "model", "model_not_found");
}

namespace {

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    default:
      return "a number";
  }
}

double number(const json& v, const char* param) {
  if (!v.is_number())
    throw invalid_request(std::string("'") + param + "' must be a number, got " + type_name(v), param);
  return v.get<double>();
}

int64_t integer(const json& v, const char* param) {
  const double d = number(v, param);
  if (d != std::floor(d) || std::abs(d) > 9.0e15)
    throw invalid_request(std::string("'") + param + "' must be an integer", param);
  return int64_t(d);
}

// A message's content: a string, or an array of {"type": "text", "text": ...} parts.
std::string message_content(const json& c, const std::string& param) {
  if (c.is_string()) return c.get<std::string>();
  if (c.is_array()) {
    std::string text;
    for (const auto& part : c) {
      if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
          !part.at("text").is_string())
        throw invalid_request("'" + param +
                                  "': only text content parts ({\"type\": \"text\", \"text\": ...}) are "
                                  "supported",
                              param);
      text += part.at("text").get<std::string>();
    }
    return text;
  }
  throw invalid_request("'" + param + "' must be a string or an array of text parts, got " + type_name(c),
                        param);
}

Conversation parse_messages(const json& m) {
  if (!m.is_array() || m.empty()) throw invalid_request("'messages' must be a non-empty array", "messages");
  Conversation c;
  for (size_t i = 0; i < m.size(); ++i) {
    const std::string p = "messages[" + std::to_string(i) + "]";
    const json& msg = m[i];
    if (!msg.is_object()) throw invalid_request("'" + p + "' must be an object", p);
    if (!msg.contains("role") || !msg.at("role").is_string())
      throw invalid_request("'" + p + ".role' is required (system, user or assistant)", p + ".role");
    const std::string role = msg.at("role").get<std::string>();
    Message out;
    if (role == "system" || role == "developer")
      out.role = Role::system;
    else if (role == "user")
      out.role = Role::user;
    else if (role == "assistant")
      out.role = Role::assistant;
    else
      throw invalid_request(
          "'" + p + ".role' is '" + role + "'; supported: system, developer, user, assistant", p + ".role");
    if (!msg.contains("content")) throw invalid_request("'" + p + ".content' is required", p + ".content");
    out.content = message_content(msg.at("content"), p + ".content");
    c.push_back(std::move(out));
  }
  if (c.back().role != Role::user)
    throw invalid_request("the last message must be from the user (the reply follows it)", "messages");
  return c;
}

}  // namespace

CompletionRequest parse_completion_request(std::string_view body, Endpoint endpoint) {
  json j;
  try {
    j = parse_json(body, "");
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
    throw invalid_request(std::string("the request body is not valid JSON: ") + e.what());
  } catch (const Error& e) {  // nested deeper than kMaxJsonDepth
    throw invalid_request(std::string("the request body is not accepted: ") + e.what());
  }
  if (!j.is_object())
    throw invalid_request(std::string("the request body must be a JSON object, got ") + type_name(j));
  CompletionRequest r;
  r.endpoint = endpoint;
  if (!j.contains("model") || !j.at("model").is_string())
    throw invalid_request("'model' is required: a string (GET /v1/models lists them)", "model");
  r.model = j.at("model").get<std::string>();
  if (endpoint == Endpoint::chat) {
    if (!j.contains("messages")) throw invalid_request("'messages' is required", "messages");
    r.messages = parse_messages(j.at("messages"));
  } else {
    if (!j.contains("prompt")) throw invalid_request("'prompt' is required", "prompt");
    const json& p = j.at("prompt");
    if (p.is_array() && p.size() == 1 && p[0].is_string())
      r.prompt = p[0].get<std::string>();  // a list of one prompt
    else if (p.is_string())
      r.prompt = p.get<std::string>();
    else
      throw invalid_request("'prompt' must be a string (one prompt per request)", "prompt");
    if (r.prompt.empty()) throw invalid_request("'prompt' is empty", "prompt");
  }
  auto present = [&](const char* k) { return j.contains(k) && !j.at(k).is_null(); };
  for (const char* k : {"max_completion_tokens", "max_tokens"})
    if (present(k)) {
      const int64_t n = integer(j.at(k), k);
      if (n < 1)
        throw invalid_request(std::string("'") + k + "' must be at least 1, got " + std::to_string(n), k);
      r.max_tokens = n;
      break;
    }
  if (present("temperature")) {
    const double t = number(j.at("temperature"), "temperature");
    if (!(t >= 0.0 && t <= 2.0)) throw invalid_request("'temperature' must be in [0, 2]", "temperature");
    r.temperature = float(t);
  }
  if (present("top_p")) {
    const double p = number(j.at("top_p"), "top_p");
    if (!(p > 0.0 && p <= 1.0)) throw invalid_request("'top_p' must be in (0, 1]", "top_p");
    r.top_p = float(p);
  }
  if (present("seed")) {
    const int64_t s = integer(j.at("seed"), "seed");
    r.seed = uint64_t(s);  // negative seeds wrap, as any 64-bit seed is fine
  }
  if (present("stop")) {
    const json& s = j.at("stop");
    if (s.is_string()) {
      r.stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      for (const auto& x : s) {
        if (!x.is_string()) throw invalid_request("'stop' must be a string or an array of strings", "stop");
        r.stop.push_back(x.get<std::string>());
      }
    } else {
      throw invalid_request("'stop' must be a string or an array of strings", "stop");
    }
    if (r.stop.size() > 4) throw invalid_request("'stop' takes at most 4 sequences", "stop");
    for (const auto& x : r.stop)
      if (x.empty()) throw invalid_request("'stop' sequences must not be empty", "stop");
  }
  if (present("stream")) {
    if (!j.at("stream").is_boolean()) throw invalid_request("'stream' must be a boolean", "stream");
    r.stream = j.at("stream").get<bool>();
  }
  if (present("stream_options")) {
    const json& so = j.at("stream_options");
    if (!so.is_object()) throw invalid_request("'stream_options' must be an object", "stream_options");
    if (!r.stream)
      throw invalid_request("'stream_options' is only allowed with 'stream': true", "stream_options");
    r.include_usage = so.value("include_usage", false);
  }
  if (present("n") && integer(j.at("n"), "n") != 1)
    throw invalid_request("'n' must be 1: one choice per request", "n");
  if (present("best_of") && integer(j.at("best_of"), "best_of") != 1)
    throw invalid_request("'best_of' must be 1", "best_of");
  // Would change the answer or its shape; refused rather than silently ignored.
  for (const char* k : {"tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs",
                        "echo", "suffix", "logit_bias", "response_format"})
    if (present(k) && !(j.at(k).is_boolean() && !j.at(k).get<bool>()))
      throw invalid_request(std::string("'") + k + "' is not supported by this server", k);
  return r;
}

namespace {

json base_object(const CompletionRequest& r, const std::string& id, int64_t created,
                 const std::string& object, const std::string& system_fingerprint) {
  return json{{"id", id},
              {"object", object},
              {"created", created},
              {"model", r.model},
              {"system_fingerprint", system_fingerprint}};
}

json usage_json(const Usage& u) {
  return json{{"prompt_tokens", u.prompt_tokens},
              {"completion_tokens", u.completion_tokens},
              {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

}  // namespace

json completion_response(const CompletionRequest& r, const std::string& id, int64_t created,
                         const std::string& text, const std::string& finish_reason, const Usage& usage,
                         const std::string& system_fingerprint) {
  const bool chat = r.endpoint == Endpoint::chat;
  json j = base_object(r, id, created, chat ? "chat.completion" : "text_completion", system_fingerprint);
  json choice{{"index", 0}, {"finish_reason", finish_reason}, {"logprobs", nullptr}};
  if (chat)
    choice["message"] = json{{"role", "assistant"}, {"content", text}};
  else
    choice["text"] = text;
  j["choices"] = json::array({choice});
  j["usage"] = usage_json(usage);
  return j;
}

json completion_chunk(const CompletionRequest& r, const std::string& id, int64_t created,
                      const std::string& text, const std::optional<std::string>& finish_reason, bool first,
                      const std::string& system_fingerprint) {
  const bool chat = r.endpoint == Endpoint::chat;
  json j =
      base_object(r, id, created, chat ? "chat.completion.chunk" : "text_completion", system_fingerprint);
  json choice{{"index", 0}, {"logprobs", nullptr}};
  choice["finish_reason"] = finish_reason ? json(*finish_reason) : json(nullptr);
  if (chat) {
    json delta = json::object();
    if (first) delta["role"] = "assistant";
    if (!finish_reason) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  j["choices"] = json::array({choice});
  return j;
}

json usage_chunk(const CompletionRequest& r, const std::string& id, int64_t created, const Usage& usage,
                 const std::string& system_fingerprint) {
  json j =
      base_object(r, id, created, r.endpoint == Endpoint::chat ? "chat.completion.chunk" : "text_completion",
                  system_fingerprint);
  j["choices"] = json::array();
  j["usage"] = usage_json(usage);
  return j;
}

std::string json_text(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string sse_event(const json& j) {
  return "data: " + json_text(j) + "\n\n";
}

}  // namespace qlora
