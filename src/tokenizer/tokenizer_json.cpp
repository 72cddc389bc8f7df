// HF tokenizer.json: parsing and the encode/decode pipeline
//   added tokens (raw) -> normalizer -> added tokens (normalized) ->
//   pre-tokenizer -> BPE -> post-processor (TemplateProcessing)
// and back through the decoder. The stages live in their own files; this one
// wires them as HF tokenizers does, so ids match HF's.
#include <fstream>
#include <nlohmann/json.hpp>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "core/json_integer.h"
#include "core/json_parse.h"
#include "tokenizer/added_tokens.h"
#include "tokenizer/bpe.h"
#include "tokenizer/decoders.h"
#include "tokenizer/loaders.h"
#include "tokenizer/normalize.h"
#include "tokenizer/pretokenize.h"

namespace qlora::tok {

namespace {

using nlohmann::json;

// The single-sequence template of a TemplateProcessing post-processor: ids to
// emit before and after the encoded text.
struct Template {
  bool present = false;
  std::vector<TokenId> before, after;
};

// A token id from the file: an integer in [0, kMaxVocabSize), never a cast
// of whatever number is there (1e115 was one, found by fuzz_tokenizer_json).
TokenId token_id_at(const json& v, const std::string& where) {
  return TokenId(json_integer_in(v, where, 0, kMaxVocabSize - 1));
}

void parse_template_processing(const json& j, const std::string& file, Template& t) {
  std::unordered_map<std::string, std::vector<TokenId>> specials;
  if (j.contains("special_tokens"))
    for (const auto& [name, v] : j.at("special_tokens").items()) {
      auto& ids = specials[name];
      for (const auto& id : v.at("ids"))
        ids.push_back(token_id_at(id, file + ": post_processor special token '" + name + "' id"));
    }
  t.present = true;
  bool seen_a = false;
  for (const auto& item : j.at("single")) {
    if (item.contains("Sequence")) {
      if (item.at("Sequence").value("id", "A") != "A")
        fail(file, ": TemplateProcessing single template uses sequence B");
      seen_a = true;
    } else if (item.contains("SpecialToken")) {
      const std::string name = item.at("SpecialToken").at("id").get<std::string>();
      const auto it = specials.find(name);
      if (it == specials.end())
        fail(file, ": TemplateProcessing names special token '", name, "' it does not define");
      auto& dst = seen_a ? t.after : t.before;
      dst.insert(dst.end(), it->second.begin(), it->second.end());
    } else {
      fail(file, ": unsupported item in TemplateProcessing template: ", item.dump());
    }
  }
}

// ByteLevel post-processing only adjusts offsets (which we do not produce);
// TemplateProcessing adds BOS/EOS. Other processors are refused by name.
void parse_post_processor(const json& j, const std::string& file, Template& t) {
  if (j.is_null()) return;
  const std::string type = j.value("type", "");
  if (type == "Sequence") {
    for (const auto& p : j.at("processors")) parse_post_processor(p, file, t);
  } else if (type == "TemplateProcessing") {
    parse_template_processing(j, file, t);
  } else if (type != "ByteLevel") {
    fail(file, ": unsupported post-processor type '", type,
         "' (supported: TemplateProcessing, ByteLevel, Sequence)");
  }
}

// The vocabulary is tokenizer.json's largest object and the merges its
// largest array; a file with more is refused before a tree is built for it.
// SentencePiece-converted merge lists run to a few times the vocabulary
// (Llama 2: 61,249 merges for 32,000 tokens).
const JsonLimits kTokenizerJsonLimits{.max_object_members = uint64_t(kMaxVocabSize),
                                      .max_array_elements = 8 * uint64_t(kMaxVocabSize),
                                      .why = "a tokenizer's vocabulary has at most 4194304 entries"};

class HfTokenizer final : public Tokenizer {
 public:
  HfTokenizer(const std::string& file, const json& j, TokenizerConfig cfg);

  std::vector<TokenId> encode(std::string_view text, bool add_special) const override;
  std::string decode(const std::vector<TokenId>& ids, bool skip_special) const override;
  std::string piece(TokenId id) const override;
  std::optional<TokenId> token_id(std::string_view piece) const override;
  int64_t vocab_size() const override { return vocab_size_; }
  std::optional<TokenId> bos_id() const override { return bos_; }
  std::optional<TokenId> eos_id() const override { return eos_; }
  bool is_special(TokenId id) const override {
    const auto it = added_by_id_.find(id);
    return it != added_by_id_.end() && added_[it->second].special;
  }
  std::optional<std::string> chat_template() const override { return cfg_.chat_template; }

 private:
  void parse_model(const json& m);
  void encode_text(std::string_view text, bool first, std::vector<TokenId>& out, Pieces& pieces,
                   BpeScratch& scratch) const;

  std::string file_;
  TokenizerConfig cfg_;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_;
  std::unique_ptr<Decoder> decoder_;
  std::unique_ptr<Bpe> bpe_;
  std::vector<AddedToken> added_;
  std::unordered_map<TokenId, size_t> added_by_id_;
  std::unordered_map<std::string, TokenId> added_by_content_;
  AddedTokenMatcher raw_matcher_;   // added tokens with normalized = false
  AddedTokenMatcher norm_matcher_;  // normalized = true, patterns normalized
  Template template_;
  std::optional<TokenId> bos_, eos_;
  int64_t vocab_size_ = 0;
};

HfTokenizer::HfTokenizer(const std::string& file, const json& j, TokenizerConfig cfg)
    : file_(file), cfg_(std::move(cfg)) {
  if (!j.is_object() || !j.contains("model")) fail(file_, ": not a tokenizer.json (no \"model\" object)");
  normalizer_ = parse_normalizer(j.value("normalizer", json()), file_);
  pre_ = parse_pre_tokenizer(j.value("pre_tokenizer", json()), file_);
  decoder_ = parse_decoder(j.value("decoder", json()), file_);
  parse_model(j.at("model"));
  parse_post_processor(j.value("post_processor", json()), file_, template_);

  vocab_size_ = bpe_->max_id() + 1;
  if (j.contains("added_tokens")) {
    for (const auto& a : j.at("added_tokens")) {
      AddedToken t;
      t.content = a.at("content").get<std::string>();
      t.id = token_id_at(a.at("id"), file_ + ": added token '" + t.content + "' id");
      t.special = a.value("special", false);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.normalized = a.value("normalized", !t.special);
      t.single_word = a.value("single_word", false);
      added_by_id_[t.id] = added_.size();
      added_by_content_[t.content] = t.id;
      vocab_size_ = std::max<int64_t>(vocab_size_, int64_t(t.id) + 1);
      added_.push_back(t);
    }
  }
  for (const auto& t : added_) {
    if (!t.normalized || !normalizer_) {
      raw_matcher_.add(t.content, t);
    } else {
      // HF matches normalized tokens in normalized text, so their patterns
      // go through the normalizer too (Llama 2: "<s>" -> "▁<s>").
      std::string p = t.content;
      normalizer_->normalize(p);
      norm_matcher_.add(std::move(p), t);
    }
  }

  if (cfg_.bos_token) bos_ = token_id(*cfg_.bos_token);
  if (!bos_ && !template_.before.empty()) bos_ = template_.before.front();
  if (cfg_.eos_token) eos_ = token_id(*cfg_.eos_token);
  if (!eos_ && !template_.after.empty()) eos_ = template_.after.back();
  // Without a template, tokenizer_config.json's add_*_token flags decide.
  if (!template_.present) {
    if (cfg_.add_bos_token.value_or(false) && bos_) template_.before.push_back(*bos_);
    if (cfg_.add_eos_token.value_or(false) && eos_) template_.after.push_back(*eos_);
  }
}

void HfTokenizer::parse_model(const json& m) {
  const std::string type = m.value("type", m.contains("merges") ? "BPE" : "");
  if (type != "BPE") fail(file_, ": unsupported tokenizer model type '", type, "' (supported: BPE)");
  if (m.contains("dropout") && !m.at("dropout").is_null() && m.at("dropout").get<double>() != 0.0)
    fail(file_, ": unsupported BPE dropout (only deterministic BPE is supported)");
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (m.contains(k) && !m.at(k).is_null() && !m.at(k).get<std::string>().empty())
      fail(file_, ": unsupported BPE option ", k);

  const json& entries = m.at("vocab");
  if (!entries.is_object())
    fail(file_, ": model.vocab must be an object of piece: id, got ", entries.type_name());
  if (entries.size() > size_t(kMaxVocabSize))
    fail(file_, ": model.vocab has ", entries.size(), " entries; a vocabulary has at most ", kMaxVocabSize);
  std::vector<std::pair<std::string, TokenId>> vocab;
  vocab.reserve(entries.size());
  for (const auto& [piece, id] : entries.items())
    vocab.emplace_back(piece, token_id_at(id, file_ + ": vocab entry '" + piece + "'"));

  // Merges come as "a b" strings or as ["a", "b"] pairs in newer files. The
  // string form is ambiguous when a piece itself contains a space (Llama 2's
  // vocab has " " and "  ", giving the merge "   "); the split chosen is the
  // first whose two sides are both vocab entries.
  std::unordered_set<std::string_view> known;  // filled on the first ambiguous merge
  std::vector<std::pair<std::string, std::string>> merges;
  if (m.contains("merges")) {
    merges.reserve(m.at("merges").size());
    for (const auto& mg : m.at("merges")) {
      if (mg.is_string()) {
        const std::string s = mg.get<std::string>();
        size_t sp = s.find(' ');
        if (sp == std::string::npos) fail(file_, ": malformed merge '", s, "' (expected \"a b\")");
        if (s.find(' ', sp + 1) != std::string::npos) {  // ambiguous: more than one space
          if (known.empty())
            for (const auto& [p, id] : vocab) known.insert(p);
          const std::string_view v(s);
          for (size_t at = sp; at != std::string::npos; at = s.find(' ', at + 1)) {
            if (known.count(v.substr(0, at)) && known.count(v.substr(at + 1))) {
              sp = at;
              break;
            }
          }
        }
        merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
      } else if (mg.is_array() && mg.size() == 2) {
        merges.emplace_back(mg[0].get<std::string>(), mg[1].get<std::string>());
      } else {
        fail(file_, ": malformed merge ", mg.dump());
      }
    }
  }

  BpeOptions opt;
  opt.byte_level = pre_ && pre_->byte_level();
  opt.byte_fallback = m.value("byte_fallback", false);
  opt.fuse_unk = m.value("fuse_unk", false);
  opt.ignore_merges = m.value("ignore_merges", false);
  if (m.contains("unk_token") && m.at("unk_token").is_string()) {
    const std::string unk = m.at("unk_token").get<std::string>();
    for (const auto& [p, id] : vocab)
      if (p == unk) opt.unk = id;
  }
  bpe_ = std::make_unique<Bpe>(vocab, merges, opt, file_);
}

void HfTokenizer::encode_text(std::string_view text, bool first, std::vector<TokenId>& out, Pieces& pieces,
                              BpeScratch& scratch) const {
  if (text.empty()) return;
  pieces.text.assign(text);
  pieces.spans.assign(1, {0, text.size()});
  if (pre_) pre_->apply(pieces, first);
  const std::string_view all(pieces.text);
  for (const auto& [b, e] : pieces.spans) bpe_->encode_word(all.substr(b, e - b), out, scratch);
}

std::vector<TokenId> HfTokenizer::encode(std::string_view text, bool add_special) const {
  std::vector<TokenId> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special) out = template_.before;
  // Per thread, not per call: the BPE caches stay warm across documents, and
  // no working buffer is allocated per call.
  thread_local BpeScratch scratch;
  thread_local Pieces pieces;
  std::vector<Segment> segs, sub;
  std::string norm;
  raw_matcher_.split(text, 0, text.size(), segs);
  for (const auto& seg : segs) {
    if (seg.id >= 0) {
      out.push_back(seg.id);
      continue;
    }
    const bool first = seg.begin == 0;
    if (!normalizer_) {
      encode_text(text.substr(seg.begin, seg.end - seg.begin), first, out, pieces, scratch);
      continue;
    }
    norm.assign(text.substr(seg.begin, seg.end - seg.begin));
    normalizer_->normalize(norm);
    sub.clear();
    norm_matcher_.split(norm, 0, norm.size(), sub);
    for (const auto& s : sub) {
      if (s.id >= 0)
        out.push_back(s.id);
      else
        encode_text(std::string_view(norm).substr(s.begin, s.end - s.begin), first && s.begin == 0, out,
                    pieces, scratch);
    }
  }
  if (add_special) out.insert(out.end(), template_.after.begin(), template_.after.end());
  return out;
}

std::string HfTokenizer::piece(TokenId id) const {
  if (const auto it = added_by_id_.find(id); it != added_by_id_.end()) return added_[it->second].content;
  if (const std::string* p = bpe_->piece(id)) return *p;
  return {};
}

std::optional<TokenId> HfTokenizer::token_id(std::string_view p) const {
  if (const auto it = added_by_content_.find(std::string(p)); it != added_by_content_.end())
    return it->second;
  return bpe_->find(p);
}

std::string HfTokenizer::decode(const std::vector<TokenId>& ids, bool skip_special) const {
  std::vector<std::string> pieces;
  pieces.reserve(ids.size());
  for (TokenId id : ids) {
    if (skip_special && is_special(id)) continue;
    // Ids the tokenizer does not know (e.g. a model's padded vocab rows) are
    // skipped, as HF does.
    if (const auto it = added_by_id_.find(id); it != added_by_id_.end())
      pieces.push_back(added_[it->second].content);
    else if (const std::string* p = bpe_->piece(id))
      pieces.push_back(*p);
  }
  if (!decoder_) {
    std::string out;
    for (size_t i = 0; i < pieces.size(); ++i) out += (i ? " " : "") + pieces[i];
    return out;
  }
  decoder_->decode(pieces);
  std::string out;
  for (const auto& p : pieces) out += p;
  return out;
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer_json(const std::filesystem::path& file, TokenizerConfig config) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(file.string(), ": cannot open tokenizer file");
  json j;
  try {
    j = parse_json(in, file.string(), kTokenizerJsonLimits);
  } catch (const json::exception& e) {
    fail(file.string(), ": malformed JSON: ", e.what());
  }
  return load_tokenizer_json(j, file.string(), std::move(config));
}

std::unique_ptr<Tokenizer> load_tokenizer_json(const nlohmann::json& j, const std::string& source,
                                               TokenizerConfig config) {
  try {
    return std::make_unique<HfTokenizer>(source, j, std::move(config));
  } catch (const json::exception& e) {
    // A field of the wrong type or a missing key: name the file.
    fail(source, ": unexpected tokenizer.json content: ", e.what());
  }
}

}  // namespace qlora::tok
