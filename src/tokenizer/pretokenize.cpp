#include "tokenizer/pretokenize.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/regex.h"

namespace qlora::tok {

namespace {

using nlohmann::json;
using Span = std::pair<size_t, size_t>;

enum class Behavior { Isolated, Removed, MergedWithPrevious, MergedWithNext };

// Splits every span of p at the matches of re, keeping pieces per behavior.
void split_spans(Pieces& p, const Regex& re, Behavior behavior) {
  std::vector<Span> out;
  out.reserve(p.spans.size() * 2);
  std::vector<Span> matches;
  for (const auto& [b, e] : p.spans) {
    matches.clear();
    re.find_all(p.text, b, e, matches);
    size_t last = b;
    // For MergedWithNext a match starts a new piece that runs to the next match.
    size_t pending = b;
    for (const auto& [mb, me] : matches) {
      switch (behavior) {
        case Behavior::Isolated:
          if (mb > last) out.emplace_back(last, mb);
          out.emplace_back(mb, me);
          break;
        case Behavior::Removed:
          if (mb > last) out.emplace_back(last, mb);
          break;
        case Behavior::MergedWithPrevious:
          out.emplace_back(last, me);
          break;
        case Behavior::MergedWithNext:
          if (mb > pending) out.emplace_back(pending, mb);
          pending = mb;
          break;
      }
      last = me;
    }
    if (behavior == Behavior::MergedWithNext) {
      if (e > pending) out.emplace_back(pending, e);
    } else if (e > last) {
      out.emplace_back(last, e);
    }
  }
  p.spans.swap(out);
}

// Rebuilds p.text with each span's content rewritten by f(content) -> string.
template <typename F>
void rewrite_spans(Pieces& p, F&& f) {
  std::string text;
  text.reserve(p.text.size() + p.text.size() / 4 + 8);
  std::vector<Span> spans;
  spans.reserve(p.spans.size());
  for (size_t k = 0; k < p.spans.size(); ++k) {
    const auto [b, e] = p.spans[k];
    const size_t start = text.size();
    text += f(std::string_view(p.text).substr(b, e - b), k);
    spans.emplace_back(start, text.size());
  }
  p.text.swap(text);
  p.spans.swap(spans);
}

class SequencePre final : public PreTokenizer {
 public:
  explicit SequencePre(std::vector<std::unique_ptr<PreTokenizer>> parts) : parts_(std::move(parts)) {}
  void apply(Pieces& p, bool first) const override {
    for (const auto& s : parts_) s->apply(p, first);
  }
  bool byte_level() const override {
    for (const auto& s : parts_)
      if (s->byte_level()) return true;
    return false;
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

class SplitPre final : public PreTokenizer {
 public:
  SplitPre(std::unique_ptr<Regex> re, Behavior b) : re_(std::move(re)), behavior_(b) {}
  void apply(Pieces& p, bool) const override { split_spans(p, *re_, behavior_); }

 private:
  std::unique_ptr<Regex> re_;
  Behavior behavior_;
};

// ByteLevel only splits here (and may add a prefix space); the byte -> visible
// code point mapping happens in the BPE model, which works on raw bytes.
class ByteLevelPre final : public PreTokenizer {
 public:
  ByteLevelPre(bool add_prefix_space, std::unique_ptr<Regex> re)
      : add_prefix_space_(add_prefix_space), re_(std::move(re)) {}
  void apply(Pieces& p, bool) const override {
    if (add_prefix_space_) {
      rewrite_spans(p, [](std::string_view s, size_t) {
        return (s.empty() || s.front() == ' ') ? std::string(s) : " " + std::string(s);
      });
    }
    if (re_) split_spans(p, *re_, Behavior::Isolated);
  }
  bool byte_level() const override { return true; }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> re_;
};

class MetaspacePre final : public PreTokenizer {
 public:
  enum class Prepend { Always, First, Never };
  MetaspacePre(std::string replacement, Prepend prepend, bool split, const std::string& file)
      : replacement_(std::move(replacement)), prepend_(prepend) {
    if (split) split_re_ = std::make_unique<Regex>(Regex::quote(replacement_), file + " (Metaspace)");
  }
  void apply(Pieces& p, bool first) const override {
    rewrite_spans(p, [&](std::string_view s, size_t k) {
      std::string out;
      out.reserve(s.size() + replacement_.size());
      const bool want = prepend_ == Prepend::Always || (prepend_ == Prepend::First && first && k == 0);
      if (want && !s.empty() && s.substr(0, replacement_.size()) != replacement_) out += replacement_;
      for (char c : s) {
        if (c == ' ')
          out += replacement_;
        else
          out.push_back(c);
      }
      return out;
    });
    if (split_re_) split_spans(p, *split_re_, Behavior::MergedWithNext);
  }

 private:
  std::string replacement_;
  Prepend prepend_;
  std::unique_ptr<Regex> split_re_;
};

Behavior parse_behavior(const json& j, const std::string& file) {
  const std::string b = j.value("behavior", "Isolated");
  if (b == "Isolated") return Behavior::Isolated;
  if (b == "Removed") return Behavior::Removed;
  if (b == "MergedWithPrevious") return Behavior::MergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::MergedWithNext;
  fail(file, ": unsupported Split behavior '", b, "'");
}

}  // namespace

std::unique_ptr<PreTokenizer> parse_pre_tokenizer(const json& j, const std::string& file) {
  if (j.is_null()) return nullptr;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (const auto& s : j.at("pretokenizers"))
      if (auto p = parse_pre_tokenizer(s, file)) parts.push_back(std::move(p));
    return std::make_unique<SequencePre>(std::move(parts));
  }
  if (type == "Split") {
    if (j.value("invert", false)) fail(file, ": unsupported Split pre-tokenizer with invert = true");
    const auto& pat = j.at("pattern");
    std::string re;
    if (pat.contains("Regex"))
      re = pat.at("Regex").get<std::string>();
    else if (pat.contains("String"))
      re = Regex::quote(pat.at("String").get<std::string>());
    else
      fail(file, ": Split pre-tokenizer has neither a String nor a Regex pattern");
    return std::make_unique<SplitPre>(std::make_unique<Regex>(re, file + " (Split pre-tokenizer)"),
                                      parse_behavior(j, file));
  }
  if (type == "ByteLevel") {
    std::unique_ptr<Regex> re;
    if (j.value("use_regex", true)) re = std::make_unique<Regex>(Regex::kGpt2Pattern, file + " (ByteLevel)");
    return std::make_unique<ByteLevelPre>(j.value("add_prefix_space", false), std::move(re));
  }
  if (type == "Digits") {
    const char* re = j.value("individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)";
    return std::make_unique<SplitPre>(std::make_unique<Regex>(re, file + " (Digits)"), Behavior::Isolated);
  }
  if (type == "Metaspace") {
    auto prepend = MetaspacePre::Prepend::Always;
    if (j.contains("prepend_scheme")) {
      const std::string s = j.at("prepend_scheme").get<std::string>();
      if (s == "first")
        prepend = MetaspacePre::Prepend::First;
      else if (s == "never")
        prepend = MetaspacePre::Prepend::Never;
      else if (s != "always")
        fail(file, ": unsupported Metaspace prepend_scheme '", s, "'");
    } else if (!j.value("add_prefix_space", true)) {
      prepend = MetaspacePre::Prepend::Never;
    }
    return std::make_unique<MetaspacePre>(j.value("replacement", std::string("\xE2\x96\x81")), prepend,
                                          j.value("split", true), file);
  }
  fail(file, ": unsupported pre-tokenizer type '", type,
       "' (supported: Sequence, Split, ByteLevel, Digits, Metaspace)");
}

}  // namespace qlora::tok
