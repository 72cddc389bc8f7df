// JSON from outside (files, request bodies) parsed with bounds on its shape.
// nlohmann's parser keeps its own stack, so a document nested two million
// levels deep does not overflow ours, but it builds two million values first
// (8 s and 370 MB for a 6 MB file) and every recursive walk over the result
// (dump(), our readers) would recurse that deep. parse_json() refuses such a
// document before nlohmann sees it, with one linear pass over the bytes that
// allocates nothing (docs/reliability.md, "Bounded input").
//
// Every parse of outside JSON goes through parse_json(); constant JSON
// written in the source does not need to.
#pragma once

#include <cstdint>
#include <istream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace qlora {

// Real files nest a few levels (tokenizer.json: 6, a chat request: 5);
// 512 leaves room for any hand-made structure and keeps recursive code safe.
inline constexpr int kMaxJsonDepth = 512;

struct JsonLimits {
  int max_depth = kMaxJsonDepth;
  // Members of one object, elements of one array (a reader that knows how
  // many entries its format can have says so before a tree is built for them).
  uint64_t max_object_members = std::numeric_limits<uint64_t>::max();
  uint64_t max_array_elements = std::numeric_limits<uint64_t>::max();
  // Appended to a count error: why the format has that limit.
  std::string_view why = {};
};

// Throws qlora::Error "<where>:<line>: ..." (without that prefix when where
// is empty) when `text` opens more than
// max_depth nested arrays/objects or a container holds too many entries.
// Syntax is not checked here: the parser reports it.
void check_json_shape(std::string_view text, std::string_view where, const JsonLimits& limits = {});

// check_json_shape, then nlohmann's parse. Syntax errors stay
// nlohmann::json::exception, which each caller words for its format.
template <class Json = nlohmann::json>
Json parse_json(std::string_view text, std::string_view where, const JsonLimits& limits = {}) {
  check_json_shape(text, where, limits);
  return Json::parse(text.data(), text.data() + text.size());
}

// The rest of `in` (an opened file), read whole, then parse_json.
std::string read_stream(std::istream& in);
template <class Json = nlohmann::json>
Json parse_json(std::istream& in, std::string_view where, const JsonLimits& limits = {}) {
  return parse_json<Json>(std::string_view(read_stream(in)), where, limits);
}

}  // namespace qlora
