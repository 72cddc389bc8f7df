#include "tokenizer/normalize.h"

#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/utypes.h>

#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"
#include "tokenizer/regex.h"
#include "tokenizer/unicode_bytes.h"

namespace qlora::tok {

namespace {

using nlohmann::json;

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts) : parts_(std::move(parts)) {}
  void normalize(std::string& s) const override {
    for (const auto& p : parts_) p->normalize(s);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

// HF prepends only to non-empty text, so "" stays "" (no lone "▁" token).
class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void normalize(std::string& s) const override {
    if (!s.empty()) s.insert(0, prefix_);
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(std::unique_ptr<Regex> re, std::string literal, std::string content)
      : re_(std::move(re)), literal_(std::move(literal)), content_(std::move(content)) {}
  void normalize(std::string& s) const override {
    if (re_) {
      std::vector<std::pair<size_t, size_t>> m;
      re_->find_all(s, 0, s.size(), m);
      if (m.empty()) return;
      std::string out;
      size_t last = 0;
      for (const auto& [b, e] : m) {
        out.append(s, last, b - last);
        out += content_;
        last = e;
      }
      out.append(s, last, std::string::npos);
      s.swap(out);
      return;
    }
    if (literal_.empty() || s.find(literal_) == std::string::npos) return;
    std::string out;
    out.reserve(s.size() + s.size() / 4);
    size_t last = 0;
    for (size_t at = s.find(literal_); at != std::string::npos; at = s.find(literal_, last)) {
      out.append(s, last, at - last);
      out += content_;
      last = at + literal_.size();
    }
    out.append(s, last, std::string::npos);
    s.swap(out);
  }

 private:
  std::unique_ptr<Regex> re_;
  std::string literal_;
  std::string content_;
};

// Strips leading/trailing ASCII whitespace, which is what HF's Strip removes in
// the files we load (space, tab, newlines).
class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& s) const override {
    const auto ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; };
    size_t b = 0, e = s.size();
    if (left_)
      while (b < e && ws(s[b])) ++b;
    if (right_)
      while (e > b && ws(s[e - 1])) --e;
    s = s.substr(b, e - b);
  }

 private:
  bool left_, right_;
};

// NFC (Qwen2's normalizer) through ICU, as HF applies it (Rust's
// unicode-normalization; both follow the Unicode tables, ICU 72 = Unicode 15).
// Invalid UTF-8 cannot reach HF (Python strings are valid); here such bytes
// are kept as they are, and only the valid runs between them are normalized,
// so the byte-level model still sees every input byte.
class NfcNormalizer final : public Normalizer {
 public:
  explicit NfcNormalizer(const std::string& file) {
    UErrorCode status = U_ZERO_ERROR;
    nfc_ = icu::Normalizer2::getNFCInstance(status);
    if (U_FAILURE(status)) fail(file, ": NFC normalizer: cannot load ICU's NFC data: ", u_errorName(status));
  }

  void normalize(std::string& s) const override {
    // Code points below U+0300 (lead bytes below 0xCC) are never changed by
    // NFC nor combine with what precedes them: most text returns here.
    bool simple = true;
    for (char c : s) simple = simple && static_cast<unsigned char>(c) < 0xCC;
    if (simple) return;
    std::string out;
    out.reserve(s.size());
    const std::string_view v(s);
    for (size_t i = 0; i < v.size();) {
      size_t j = i;
      while (j < v.size() && utf8_valid_len(v, j) > 0) j += utf8_valid_len(v, j);
      if (j > i) append_nfc(v.substr(i, j - i), out);
      for (; j < v.size() && utf8_valid_len(v, j) == 0; ++j) out.push_back(v[j]);  // invalid bytes: as they are
      i = j;
    }
    s.swap(out);
  }

 private:
  void append_nfc(std::string_view valid, std::string& out) const {
    UErrorCode status = U_ZERO_ERROR;
    icu::StringByteSink<std::string> sink(&out);
    nfc_->normalizeUTF8(0, icu::StringPiece(valid.data(), static_cast<int32_t>(valid.size())), sink, nullptr,
                        status);
    if (U_FAILURE(status)) fail("NFC normalization failed: ", u_errorName(status));
  }

  const icu::Normalizer2* nfc_;  // owned by ICU, immutable and thread-safe
};

}  // namespace

std::unique_ptr<Normalizer> parse_normalizer(const json& j, const std::string& file) {
  if (j.is_null()) return nullptr;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (const auto& n : j.at("normalizers"))
      if (auto p = parse_normalizer(n, file)) parts.push_back(std::move(p));
    return std::make_unique<SequenceNormalizer>(std::move(parts));
  }
  if (type == "Prepend") return std::make_unique<PrependNormalizer>(j.at("prepend").get<std::string>());
  if (type == "Replace") {
    const auto& pat = j.at("pattern");
    std::string content = j.at("content").get<std::string>();
    if (pat.contains("String"))
      return std::make_unique<ReplaceNormalizer>(nullptr, pat.at("String").get<std::string>(), std::move(content));
    if (pat.contains("Regex"))
      return std::make_unique<ReplaceNormalizer>(
          std::make_unique<Regex>(pat.at("Regex").get<std::string>(), file + " (Replace normalizer)"), "",
          std::move(content));
    fail(file, ": Replace normalizer has neither a String nor a Regex pattern");
  }
  if (type == "Strip") return std::make_unique<StripNormalizer>(j.value("strip_left", true), j.value("strip_right", true));
  if (type == "NFC") return std::make_unique<NfcNormalizer>(file);
  fail(file, ": unsupported normalizer type '", type, "' (supported: Sequence, Prepend, Replace, Strip, NFC)");
}

}  // namespace qlora::tok
