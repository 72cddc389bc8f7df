#include "core/json_parse.h"

#include <algorithm>
#include <vector>

#include "core/error.h"

namespace qlora {

namespace {

// "<where>:<line>: " for the byte at `offset`; nothing when where is empty
// (a caller that names the record itself, as the JSONL reader does).
std::string prefix(std::string_view text, std::string_view where, size_t offset) {
  if (where.empty()) return {};
  return str(where, ":", 1 + std::count(text.begin(), text.begin() + std::min(offset, text.size()), '\n'),
             ": ");
}

}  // namespace

// Sized first where the stream can tell (a file), so a large file costs its
// size once, not the doubling growth of a string stream.
std::string read_stream(std::istream& in) {
  std::string text;
  const std::istream::pos_type start = in.tellg();
  if (start != std::istream::pos_type(-1) && in.seekg(0, std::ios::end)) {
    const std::istream::pos_type end = in.tellg();
    if (end != std::istream::pos_type(-1) && end > start) text.reserve(size_t(end - start));
    in.seekg(start);
  }
  in.clear();
  char buf[1 << 16];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) text.append(buf, size_t(in.gcount()));
  return text;
}

// Brackets and commas count only outside strings. Up to the first syntax
// error the text is a valid JSON prefix, where a string starts at an
// unescaped '"' and ends at the next one, exactly as the parser sees it; after
// a syntax error the parser stops, so what is counted there does not matter.
void check_json_shape(std::string_view text, std::string_view where, const JsonLimits& limits) {
  // For each open container: is it an object, and how many commas so far.
  struct Open {
    bool object;
    uint64_t commas;
  };
  std::vector<Open> open;
  open.reserve(64);
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        break;
      case '[':
      case '{':
        if (open.size() >= size_t(limits.max_depth))
          fail(prefix(text, where, i), "JSON nested deeper than ", limits.max_depth, " levels (at byte ",
               i + 1, ")");
        open.push_back({c == '{', 0});
        break;
      case ']':
      case '}':
        if (!open.empty()) open.pop_back();
        break;
      case ',':
        if (!open.empty()) {
          Open& o = open.back();
          const uint64_t max = o.object ? limits.max_object_members : limits.max_array_elements;
          if (++o.commas >= max)  // commas + 1 entries
            fail(prefix(text, where, i), "a JSON ", o.object ? "object" : "array", " with more than ", max,
                 o.object ? " members" : " elements", limits.why.empty() ? "" : " (", limits.why,
                 limits.why.empty() ? "" : ")");
        }
        break;
      default:
        break;
    }
  }
}

}  // namespace qlora
