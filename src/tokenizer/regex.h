// A compiled PCRE2 pattern for pre-tokenization (Unicode properties on, JIT
// when available). HF tokenizers compile their Split/ByteLevel patterns with
// Oniguruma; PCRE2 with PCRE2_UTF | PCRE2_UCP gives the same \p{L}, \p{N}, \s
// semantics for these patterns without us shipping Unicode tables.
//
// Matching never fails on invalid UTF-8: PCRE2_MATCH_INVALID_UTF makes such
// bytes simply not match, so they land in the gaps between matches, which the
// callers keep as pieces of their own.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

struct pcre2_real_code_8;

namespace qlora::tok {

class Regex {
 public:
  // `origin` names where the pattern came from, for error messages.
  Regex(std::string_view pattern, const std::string& origin);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the [begin, end) byte spans of all non-overlapping matches in
  // s[from, to), left to right. Empty matches are skipped. Thread-safe.
  void find_all(std::string_view s, size_t from, size_t to, std::vector<std::pair<size_t, size_t>>& out) const;

  // The pattern HF uses for ByteLevel with use_regex = true (GPT-2's).
  static constexpr std::string_view kGpt2Pattern =
      R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

  // Escapes a literal string for use inside a pattern.
  static std::string quote(std::string_view literal);

 private:
  pcre2_real_code_8* code_ = nullptr;
};

}  // namespace qlora::tok
