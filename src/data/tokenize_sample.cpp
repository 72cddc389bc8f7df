#include "data/tokenize_sample.h"

#include <algorithm>
#include <string>

#include "core/error.h"

namespace qlora {

namespace {

size_t common_prefix(const std::vector<TokenId>& a, const std::vector<TokenId>& b) {
  const size_t n = std::min(a.size(), b.size());
  size_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}

// Encodes one run of ordinary segments as a single text and works out which
// tokens belong to trained segments. Tokens are found per segment boundary by
// encoding the run's prefix up to the boundary: when that is a prefix of the
// whole run's tokens the boundary falls between tokens; otherwise the first
// differing token spans the boundary and is trained if either side is (the
// model must produce it to produce the reply).
void encode_run(const Tokenizer& tok, const std::vector<const Segment*>& run, std::vector<TokenId>& ids,
                std::vector<char>& trained) {
  std::string text;
  for (const Segment* s : run) text += s->text;
  const std::vector<TokenId> all = tok.encode(text, false);
  std::vector<char> flag(all.size(), 0);
  size_t from = 0, offset = 0;
  for (size_t k = 0; k < run.size(); ++k) {
    offset += run[k]->text.size();
    size_t cut = all.size();
    bool straddle = false;
    if (k + 1 < run.size()) {
      const std::vector<TokenId> prefix = tok.encode(std::string_view(text).substr(0, offset), false);
      cut = common_prefix(prefix, all);
      straddle = cut < prefix.size() && cut < all.size();
    }
    cut = std::max(cut, from);
    for (size_t i = from; i < cut; ++i) flag[i] = run[k]->trained;
    from = cut;
    if (straddle && from < all.size()) {
      flag[from] = run[k]->trained || run[k + 1]->trained;
      ++from;
    }
  }
  ids.insert(ids.end(), all.begin(), all.end());
  trained.insert(trained.end(), flag.begin(), flag.end());
}

TokenizedSample finish(std::vector<TokenId> ids, const std::vector<char>& trained, bool train_on_inputs) {
  TokenizedSample out;
  out.labels.resize(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) out.labels[i] = trained[i] || train_on_inputs ? ids[i] : kIgnoreLabel;
  if (!out.labels.empty()) out.labels[0] = kIgnoreLabel;
  out.input_ids = std::move(ids);
  return out;
}

}  // namespace

bool tokenizer_adds_bos(const Tokenizer& tok) {
  const auto bos = tok.bos_id();
  if (!bos) return false;
  const auto probe = tok.encode("", true);
  return !probe.empty() && probe.front() == *bos;
}

ChatTemplate template_for_tokenizer(const Tokenizer& tok, std::string_view name, TemplateOptions options) {
  if (options.eos_token.empty()) {
    if (const auto eos = tok.eos_id()) options.eos_token = tok.piece(*eos);
  }
  return ChatTemplate::resolve(name, tok.chat_template(), std::move(options));
}

TokenizedSample tokenize_segments(const Tokenizer& tok, const std::vector<Segment>& segments, bool add_bos,
                                  bool train_on_inputs) {
  std::vector<TokenId> ids;
  std::vector<char> trained;
  if (add_bos) {
    const auto bos = tok.bos_id();
    if (!bos) fail("the tokenizer has no BOS token");
    ids.push_back(*bos);
    trained.push_back(0);
  }
  std::vector<const Segment*> run;
  auto flush = [&] {
    if (!run.empty()) encode_run(tok, run, ids, trained);
    run.clear();
  };
  for (const Segment& s : segments) {
    if (!s.special_text) {
      run.push_back(&s);
      continue;
    }
    flush();
    const auto id = tok.token_id(s.text);
    if (!id)
      fail("special token \"", s.text, "\" of the chat template is not in the tokenizer's vocabulary ",
           "(is the chat template right for this model?)");
    ids.push_back(*id);
    trained.push_back(s.trained);
  }
  flush();
  return finish(std::move(ids), trained, train_on_inputs);
}

TokenizedSample tokenize_sample(const Tokenizer& tok, const ChatTemplate& tmpl, const Sample& s,
                                const TokenizeOptions& o) {
  try {
    switch (s.kind) {
      case Sample::Kind::conversation: {
        const bool bos = !tmpl.renders_bos() && tokenizer_adds_bos(tok);
        return tokenize_segments(tok, tmpl.render(s.conversation), bos, o.train_on_inputs);
      }
      case Sample::Kind::text: {
        std::vector<TokenId> ids = tok.encode(s.text, false);
        if (tokenizer_adds_bos(tok)) ids.insert(ids.begin(), *tok.bos_id());
        if (o.append_eos) {
          const auto eos = tok.eos_id();
          if (!eos) fail("append_eos: the tokenizer has no EOS token");
          ids.push_back(*eos);
        }
        const std::vector<char> all_trained(ids.size(), 1);
        return finish(std::move(ids), all_trained, false);
      }
      case Sample::Kind::tokens: {
        const int64_t vocab = tok.vocab_size();
        for (size_t i = 0; i < s.input_ids.size(); ++i)
          if (s.input_ids[i] >= vocab)
            fail("input_ids[", i, "] = ", s.input_ids[i], " is not below the vocabulary size ", vocab);
        if (s.labels.empty() || o.train_on_inputs)
          return finish(s.input_ids, std::vector<char>(s.input_ids.size(), 1), false);
        if (s.labels.size() != s.input_ids.size())
          fail("labels has ", s.labels.size(), " entries but input_ids has ", s.input_ids.size());
        TokenizedSample out{s.input_ids, s.labels};
        if (!out.labels.empty()) out.labels[0] = kIgnoreLabel;
        return out;
      }
    }
  } catch (const Error& e) {
    fail(s.where, ": ", e.what());
  }
  fail(s.where, ": unknown sample kind");
}

}  // namespace qlora
