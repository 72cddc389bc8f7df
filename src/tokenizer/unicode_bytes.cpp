#include "tokenizer/unicode_bytes.h"

namespace qlora::tok {

size_t utf8_valid_len(std::string_view s, size_t i) {
  const auto at = [&](size_t k) { return static_cast<uint8_t>(s[k]); };
  const uint8_t c = at(i);
  if (c < 0x80) return 1;
  size_t n;
  uint32_t min_cp;
  uint32_t cp;
  if ((c & 0xE0) == 0xC0) {
    n = 2, min_cp = 0x80, cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    n = 3, min_cp = 0x800, cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    n = 4, min_cp = 0x10000, cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((at(i + k) & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (at(i + k) & 0x3F);
  }
  // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
  if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

bool utf8_is_valid(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_valid_len(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

uint32_t utf8_decode(std::string_view s, size_t i, size_t len) {
  const auto at = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(s[k])); };
  if (len == 1) return at(i);
  uint32_t cp = at(i) & (len == 2 ? 0x1F : len == 3 ? 0x0F : 0x07);
  for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (at(i + k) & 0x3F);
  return cp;
}

const ByteLevelTable& ByteLevelTable::get() {
  // Immutable after construction; C++ guarantees thread-safe initialization.
  static const ByteLevelTable table;
  return table;
}

ByteLevelTable::ByteLevelTable() {
  from_cp_.fill(-1);
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool visible = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    const uint32_t cp = visible ? b : next++;
    utf8_append(to_unicode_[b], cp);
    from_cp_[cp] = static_cast<int16_t>(b);
  }
}

std::string ByteLevelTable::encode(std::string_view raw) const {
  std::string out;
  out.reserve(raw.size() * 2);
  for (char c : raw) out += to_unicode_[static_cast<uint8_t>(c)];
  return out;
}

std::optional<std::string> ByteLevelTable::decode(std::string_view mapped) const {
  std::string out;
  out.reserve(mapped.size());
  for (size_t i = 0; i < mapped.size();) {
    const size_t n = utf8_valid_len(mapped, i);
    if (n == 0) return std::nullopt;
    const uint32_t cp = utf8_decode(mapped, i, n);
    if (cp >= from_cp_.size() || from_cp_[cp] < 0) return std::nullopt;
    out.push_back(static_cast<char>(from_cp_[cp]));
    i += n;
  }
  return out;
}

}  // namespace qlora::tok
