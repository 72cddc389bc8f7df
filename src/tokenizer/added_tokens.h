// Added tokens (tokenizer.json "added_tokens"): strings matched in the text
// before normalization/BPE and emitted as one id, never split.
//
// Matching is leftmost-longest, as HF's Aho-Corasick matcher does: at the
// first position where any token matches, the longest one wins. lstrip/rstrip
// widen a match over the whitespace beside it; single_word requires the match
// not to touch word characters.
#pragma once

#include <array>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace qlora::tok {

struct AddedToken {
  TokenId id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool single_word = false;
};

// A piece of text: either plain text [begin, end) or an added token (id >= 0)
// that covered [begin, end).
struct Segment {
  size_t begin, end;
  TokenId id;  // -1 for plain text
};

class AddedTokenMatcher {
 public:
  AddedTokenMatcher() { first_.fill(false); }
  // pattern: the string to look for (the content, or its normalized form).
  void add(std::string pattern, const AddedToken& t);
  bool empty() const { return entries_.empty(); }

  // Appends the segments of text[from, to) to out. Thread-safe.
  void split(std::string_view text, size_t from, size_t to, std::vector<Segment>& out) const;

 private:
  struct Entry {
    std::string pattern;
    TokenId id;
    bool lstrip, rstrip, single_word;
  };
  std::vector<Entry> entries_;
  std::array<std::vector<size_t>, 256> by_first_;  // entry indices, longest first
  std::array<bool, 256> first_;
};

}  // namespace qlora::tok
