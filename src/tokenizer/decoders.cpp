#include "tokenizer/decoders.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_integer.h"
#include "tokenizer/unicode_bytes.h"

namespace qlora::tok {

namespace {

using nlohmann::json;

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) s.replace(at, from.size(), to);
}

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts) : parts_(std::move(parts)) {}
  void decode(std::vector<std::string>& pieces) const override {
    for (const auto& d : parts_) d->decode(pieces);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

// Maps byte-level code points back to bytes. A piece with a code point outside
// the table (an added token stored verbatim) is kept as is, like HF.
class ByteLevelDecoder final : public Decoder {
 public:
  void decode(std::vector<std::string>& pieces) const override {
    const auto& table = ByteLevelTable::get();
    std::string out;
    for (const auto& p : pieces) {
      if (auto raw = table.decode(p))
        out += *raw;
      else
        out += p;
    }
    pieces.assign(1, std::move(out));
  }
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(std::string from, std::string to) : from_(std::move(from)), to_(std::move(to)) {}
  void decode(std::vector<std::string>& pieces) const override {
    for (auto& p : pieces) replace_all(p, from_, to_);
  }

 private:
  std::string from_, to_;
};

class ByteFallbackDecoder final : public Decoder {
 public:
  void decode(std::vector<std::string>& pieces) const override {
    for (auto& p : pieces) {
      if (p.size() != 6 || p.compare(0, 3, "<0x") != 0 || p[5] != '>') continue;
      const auto hex = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        return -1;
      };
      const int hi = hex(p[3]), lo = hex(p[4]);
      if (hi < 0 || lo < 0) continue;
      p.assign(1, static_cast<char>(hi * 16 + lo));
    }
  }
};

class FuseDecoder final : public Decoder {
 public:
  void decode(std::vector<std::string>& pieces) const override {
    std::string out;
    for (const auto& p : pieces) out += p;
    pieces.assign(1, std::move(out));
  }
};

// Removes up to `start` leading and `stop` trailing copies of content from
// every piece (after Fuse there is one piece: the leading space of "▁Hello").
class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void decode(std::vector<std::string>& pieces) const override {
    if (content_.empty()) return;
    const size_t n = content_.size();
    for (auto& p : pieces) {
      size_t b = 0, e = p.size();
      for (size_t k = 0; k < start_ && e - b >= n && p.compare(b, n, content_) == 0; ++k) b += n;
      for (size_t k = 0; k < stop_ && e - b >= n && p.compare(e - n, n, content_) == 0; ++k) e -= n;
      p = p.substr(b, e - b);
    }
  }

 private:
  std::string content_;
  size_t start_, stop_;
};

// HF drops the replacement characters of the first piece (the prepended
// space) unless prepend_scheme is "never", and turns the others into spaces.
class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool prepend) : replacement_(std::move(replacement)), prepend_(prepend) {}
  void decode(std::vector<std::string>& pieces) const override {
    for (size_t i = 0; i < pieces.size(); ++i) replace_all(pieces[i], replacement_, i == 0 && prepend_ ? "" : " ");
  }

 private:
  std::string replacement_;
  bool prepend_;
};

}  // namespace

std::unique_ptr<Decoder> parse_decoder(const json& j, const std::string& file) {
  if (j.is_null()) return nullptr;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Decoder>> parts;
    for (const auto& d : j.at("decoders"))
      if (auto p = parse_decoder(d, file)) parts.push_back(std::move(p));
    return std::make_unique<SequenceDecoder>(std::move(parts));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Replace") {
    const auto& pat = j.at("pattern");
    if (!pat.contains("String")) fail(file, ": unsupported Replace decoder with a non-String pattern");
    return std::make_unique<ReplaceDecoder>(pat.at("String").get<std::string>(), j.at("content").get<std::string>());
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    // How many characters to strip: a count, bounded by any real use (HF's
    // Llama 2 strips 1), never a cast of a float or a negative number.
    const auto count = [&](const char* key) {
      return j.contains(key)
                 ? size_t(json_integer_in(j.at(key), str(file, ": Strip decoder \"", key, "\""), 0, 1 << 20))
                 : size_t(0);
    };
    return std::make_unique<StripDecoder>(j.at("content").get<std::string>(), count("start"), count("stop"));
  }
  if (type == "Metaspace") {
    bool prepend = j.value("add_prefix_space", true);
    if (j.contains("prepend_scheme")) prepend = j.at("prepend_scheme").get<std::string>() != "never";
    return std::make_unique<MetaspaceDecoder>(j.value("replacement", std::string("\xE2\x96\x81")), prepend);
  }
  fail(file, ": unsupported decoder type '", type,
       "' (supported: Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace)");
}

}  // namespace qlora::tok
