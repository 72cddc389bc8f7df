// UTF-8 helpers and the GPT-2 byte <-> unicode table used by byte-level BPE.
//
// Byte-level tokenizers (GPT-2, Llama 3, Qwen2, SmolLM) store every vocabulary
// entry as a string of "visible" code points: each raw byte b is mapped to one
// code point so that whitespace and control bytes never appear in the vocab.
// Keeping the table in one place lets the BPE model work on raw bytes and only
// translate at the vocabulary boundary.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace qlora::tok {

// Length of the UTF-8 sequence starting at s[i] if it is a valid, complete,
// shortest-form sequence; 0 if the byte there does not start one.
size_t utf8_valid_len(std::string_view s, size_t i);

// Length to step over at s[i]: the valid sequence length, or 1 for a byte
// that is not part of a valid sequence (so callers never stall or overrun).
inline size_t utf8_step(std::string_view s, size_t i) {
  const size_t n = utf8_valid_len(s, i);
  return n == 0 ? 1 : n;
}

bool utf8_is_valid(std::string_view s);

// Appends the UTF-8 encoding of a code point (< 0x110000).
void utf8_append(std::string& out, uint32_t cp);

// Decodes the valid sequence at s[i] (caller checked utf8_valid_len > 0).
uint32_t utf8_decode(std::string_view s, size_t i, size_t len);

// The GPT-2 byte-level alphabet: printable Latin-1 bytes map to themselves,
// the other 68 bytes to U+0100.. in byte order (so ' ' -> 'Ġ', '\n' -> 'Ċ').
class ByteLevelTable {
 public:
  static const ByteLevelTable& get();

  // UTF-8 of the code point byte b maps to.
  const std::string& encode(uint8_t b) const { return to_unicode_[b]; }
  // Maps every byte of raw through the table.
  std::string encode(std::string_view raw) const;
  // Inverse mapping of a whole string; nullopt if some code point is not in
  // the table (e.g. an added token stored verbatim).
  std::optional<std::string> decode(std::string_view mapped) const;

 private:
  ByteLevelTable();
  std::array<std::string, 256> to_unicode_;
  std::array<int16_t, 512> from_cp_;  // code point (< 0x200) -> byte, or -1
};

}  // namespace qlora::tok
