#include "serve/generation.h"

#include <algorithm>
#include <random>

#include "core/error.h"

namespace qlora {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::stop:
      return "stop";
    case FinishReason::length:
      return "length";
    case FinishReason::cancelled:
      return "cancelled";
  }
  return "?";
}

std::vector<int64_t> end_of_sequence_ids(const ModelConfig& cfg, const Tokenizer* tok, bool chat) {
  std::vector<int64_t> eos = cfg.eos_token_ids;
  if (chat && tok && tok->eos_id()) eos.push_back(*tok->eos_id());
  return eos;
}

GeneratedTokens generate_tokens(TokenGenerator& gen, int64_t vocab_size, const std::vector<int32_t>& prompt,
                                const std::vector<int64_t>& eos, const GenerationSettings& s,
                                const TokenCallback& on_token, const std::function<bool()>& stopped) {
  if (prompt.empty()) fail("generation: the prompt holds no token");
  if (s.max_new_tokens <= 0) fail("generation: max_new_tokens must be positive, got ", s.max_new_tokens);
  if (gen.length() + int64_t(prompt.size()) + s.max_new_tokens > gen.capacity())
    fail("generation: prompt (", prompt.size(), " tokens) + ", s.max_new_tokens, " new tokens exceed the ",
         gen.capacity(), " the generator holds");
  std::vector<float> logits(static_cast<size_t>(vocab_size));
  gen.feed(prompt.data(), int64_t(prompt.size()), logits.data());
  std::mt19937_64 rng(s.seed);
  GeneratedTokens out;
  out.finish = FinishReason::length;
  for (int64_t n = 0; n < s.max_new_tokens; ++n) {
    const int32_t id = sample_token(logits.data(), vocab_size, s.sampling, rng);
    const bool end = !s.ignore_eos && std::find(eos.begin(), eos.end(), id) != eos.end();
    if (end && s.chat) {  // the reply alone
      out.finish = FinishReason::stop;
      break;
    }
    out.ids.push_back(id);
    if (end) {
      out.finish = FinishReason::stop;
      break;
    }
    if (on_token && !on_token(id)) {
      out.finish = stopped && stopped() ? FinishReason::stop : FinishReason::cancelled;
      break;
    }
    if (n + 1 < s.max_new_tokens) gen.feed(&id, 1, logits.data());
  }
  return out;
}

namespace {

// Bytes at the end of s that start a UTF-8 sequence not yet complete (0-3).
size_t incomplete_utf8_tail(const std::string& s) {
  const size_t n = s.size();
  for (size_t back = 1; back <= std::min<size_t>(3, n); ++back) {
    const auto c = static_cast<unsigned char>(s[n - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    const size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    return need > back ? back : 0;
  }
  return 0;
}

}  // namespace

ReplyText::ReplyText(const Tokenizer& tok, std::vector<std::string> stops)
    : tok_(tok), stops_(std::move(stops)) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

std::string ReplyText::push(int32_t id) {
  if (stopped_) return {};
  ids_.push_back(id);
  std::string full = tok_.decode(ids_, /*skip_special=*/true);
  size_t cut = std::string::npos;
  for (const auto& stop : stops_) cut = std::min(cut, full.find(stop));
  if (cut != std::string::npos) {
    full.resize(cut);
    stopped_ = true;
  }
  if (full.compare(0, shown_, text_, 0, shown_) != 0) diverged_ = true;
  text_ = std::move(full);
  if (diverged_ || stopped_) return stopped_ && !diverged_ ? finish() : std::string();
  // Hold back what could still grow into a stop string, and a cut UTF-8 sequence.
  size_t hold = incomplete_utf8_tail(text_);
  for (const auto& stop : stops_)
    for (size_t k = std::min(stop.size() - 1, text_.size()); k > hold; --k)
      if (text_.compare(text_.size() - k, k, stop, 0, k) == 0) {
        hold = k;
        break;
      }
  const size_t safe = text_.size() - hold;
  if (safe <= shown_) return {};
  std::string fresh = text_.substr(shown_, safe - shown_);
  shown_ = safe;
  return fresh;
}

std::string ReplyText::finish() {
  if (diverged_ || shown_ >= text_.size()) {
    shown_ = text_.size();
    return {};
  }
  std::string rest = text_.substr(shown_);
  shown_ = text_.size();
  return rest;
}

std::string sanitize_utf8(const std::string& s) {
  static const char kReplacement[] = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      out += char(c);
      ++i;
      continue;
    }
    // Lead byte -> length and the allowed range of the second byte (which
    // excludes overlongs, surrogates and code points past U+10FFFF).
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
      len = 2;
    else if (c == 0xE0)
      len = 3, lo = 0xA0;
    else if (c >= 0xE1 && c <= 0xEC)
      len = 3;
    else if (c == 0xED)
      len = 3, hi = 0x9F;
    else if (c >= 0xEE && c <= 0xEF)
      len = 3;
    else if (c == 0xF0)
      len = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3)
      len = 4;
    else if (c == 0xF4)
      len = 4, hi = 0x8F;
    if (len == 0) {  // not a lead byte: one replacement for it
      out += kReplacement;
      ++i;
      continue;
    }
    size_t k = 1;
    for (; k < len && i + k < s.size(); ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
      if (b < l || b > h) break;
    }
    if (k == len) {
      out.append(s, i, len);
    } else {
      out += kReplacement;  // the maximal subpart [i, i+k) is one replacement
    }
    i += k;
  }
  return out;
}

}  // namespace qlora
