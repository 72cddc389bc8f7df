#include "tokenizer/added_tokens.h"

#include <algorithm>

namespace qlora::tok {

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// Word characters for single_word: ASCII alphanumerics, '_' and any non-ASCII
// byte (letters of other scripts), which is close enough to HF's
// char::is_alphanumeric for a flag none of the supported files sets.
bool is_word(char c) {
  const auto u = static_cast<unsigned char>(c);
  return u >= 0x80 || c == '_' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

}  // namespace

void AddedTokenMatcher::add(std::string pattern, const AddedToken& t) {
  if (pattern.empty()) return;  // an empty pattern would match everywhere
  const auto first = static_cast<unsigned char>(pattern[0]);
  entries_.push_back({std::move(pattern), t.id, t.lstrip, t.rstrip, t.single_word});
  // Keep each bucket longest first (ties in insertion order) so the first
  // hit at a position is the longest match.
  auto& bucket = by_first_[first];
  const size_t len = entries_.back().pattern.size();
  const auto at = std::find_if(bucket.begin(), bucket.end(), [&](size_t k) { return entries_[k].pattern.size() < len; });
  bucket.insert(at, entries_.size() - 1);
  first_[first] = true;
}

void AddedTokenMatcher::split(std::string_view text, size_t from, size_t to, std::vector<Segment>& out) const {
  size_t plain = from;  // start of the pending plain-text segment
  size_t i = from;
  while (i < to) {
    if (!first_[static_cast<unsigned char>(text[i])]) {
      ++i;
      continue;
    }
    const Entry* hit = nullptr;
    for (size_t k : by_first_[static_cast<unsigned char>(text[i])]) {
      const Entry& e = entries_[k];
      if (e.pattern.size() > to - i || text.compare(i, e.pattern.size(), e.pattern) != 0) continue;
      const size_t end = i + e.pattern.size();
      if (e.single_word && ((i > from && is_word(text[i - 1])) || (end < to && is_word(text[end])))) continue;
      hit = &e;
      break;
    }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    size_t b = i, e = i + hit->pattern.size();
    if (hit->lstrip)
      while (b > plain && is_space(text[b - 1])) --b;
    if (hit->rstrip)
      while (e < to && is_space(text[e])) ++e;
    if (b > plain) out.push_back({plain, b, -1});
    out.push_back({b, e, hit->id});
    plain = i = e;
  }
  if (to > plain) out.push_back({plain, to, -1});
}

}  // namespace qlora::tok
