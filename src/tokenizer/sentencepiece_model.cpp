// tokenizer.model through libsentencepiece, for folders without a
// tokenizer.json (original Llama 2 / Mistral releases).
//
// SentencePiece itself treats control pieces such as "<s>" in the text as
// plain characters; to honour the Tokenizer contract (special tokens in the
// text are matched, never split) the text is first cut at control and unknown
// pieces and each remaining part is encoded on its own, which is what HF's
// slow LlamaTokenizer does too.
#include <sentencepiece_processor.h>

#include <fstream>
#include <optional>
#include <sstream>
#include <string_view>

#include "core/error.h"
#include "tokenizer/added_tokens.h"
#include "tokenizer/loaders.h"

namespace qlora::tok {

namespace {

// How many pieces (ModelProto field 1) a serialized model holds, counted in
// the protobuf wire format without building anything, so that a vocabulary
// over kMaxVocabSize is refused before libsentencepiece allocates for it.
// nullopt when the bytes are not well-formed protobuf (the library says why).
std::optional<uint64_t> count_pieces(std::string_view b) {
  size_t i = 0;
  const auto varint = [&](uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (i >= b.size()) return false;
      const auto c = static_cast<uint8_t>(b[i++]);
      v |= uint64_t(c & 0x7f) << shift;
      if (!(c & 0x80)) return true;
    }
    return false;
  };
  uint64_t pieces = 0, key = 0, v = 0;
  while (i < b.size()) {
    if (!varint(key)) return std::nullopt;
    switch (key & 7) {
      case 0:  // varint
        if (!varint(v)) return std::nullopt;
        break;
      case 1:  // fixed64
        if (b.size() - i < 8) return std::nullopt;
        i += 8;
        break;
      case 2:  // length-delimited: a piece is a message in field 1
        if (!varint(v) || v > b.size() - i) return std::nullopt;
        i += size_t(v);
        if ((key >> 3) == 1) ++pieces;
        break;
      case 5:  // fixed32
        if (b.size() - i < 4) return std::nullopt;
        i += 4;
        break;
      default:
        return std::nullopt;
    }
  }
  return pieces;
}

std::string read_model_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (!in) fail(path, ": cannot read tokenizer file");
  return std::move(ss).str();
}

class SpmTokenizer final : public Tokenizer {
 public:
  // `model` is a file path, or (from_bytes) the serialized model itself;
  // `source` names it in errors.
  SpmTokenizer(const std::string& model, bool from_bytes, const std::string& source, TokenizerConfig cfg)
      : cfg_(std::move(cfg)) {
    const std::string bytes = from_bytes ? std::string() : read_model_file(model);
    const std::string_view proto = from_bytes ? std::string_view(model) : std::string_view(bytes);
    if (const auto n = count_pieces(proto); n && *n > uint64_t(kMaxVocabSize))
      fail(source, ": the model has ", *n, " pieces; a vocabulary has at most ", kMaxVocabSize);
    sentencepiece::util::Status st;
    try {
      st = sp_.LoadFromSerializedProto(proto);
    } catch (const std::exception& e) {
      // The library throws on some malformed models (an empty piece makes its
      // trie builder throw "zero-length key"; found by fuzz/fuzz_sentencepiece).
      fail(source, ": cannot load SentencePiece model: ", e.what());
    }
    if (!st.ok()) fail(source, ": cannot load SentencePiece model: ", st.ToString());
    for (int id = 0; id < sp_.GetPieceSize(); ++id) {
      if (!sp_.IsControl(id) && !sp_.IsUnknown(id)) continue;
      AddedToken t;
      t.id = id;
      t.special = true;
      specials_.add(sp_.IdToPiece(id), t);
    }
    if (cfg_.bos_token) bos_ = token_id(*cfg_.bos_token);
    if (!bos_ && sp_.bos_id() >= 0) bos_ = sp_.bos_id();
    if (cfg_.eos_token) eos_ = token_id(*cfg_.eos_token);
    if (!eos_ && sp_.eos_id() >= 0) eos_ = sp_.eos_id();
  }

  std::vector<TokenId> encode(std::string_view text, bool add_special) const override {
    std::vector<TokenId> out;
    if (add_special && cfg_.add_bos_token.value_or(true) && bos_) out.push_back(*bos_);
    std::vector<Segment> segs;
    specials_.split(text, 0, text.size(), segs);
    for (const auto& s : segs) {
      if (s.id >= 0) {
        out.push_back(s.id);
        continue;
      }
      const auto ids = sp_.EncodeAsIds(text.substr(s.begin, s.end - s.begin));
      out.insert(out.end(), ids.begin(), ids.end());
    }
    if (add_special && cfg_.add_eos_token.value_or(false) && eos_) out.push_back(*eos_);
    return out;
  }

  std::string decode(const std::vector<TokenId>& ids, bool skip_special) const override {
    std::string out;
    std::vector<int> run;
    const auto flush = [&] {
      if (!run.empty()) out += sp_.DecodeIds(run);
      run.clear();
    };
    for (TokenId id : ids) {
      if (id < 0 || id >= sp_.GetPieceSize()) continue;  // unknown ids are skipped, as HF does
      if (!is_special(id)) {
        run.push_back(id);
        continue;
      }
      flush();
      if (!skip_special) out += sp_.IdToPiece(id);
    }
    flush();
    return out;
  }

  std::string piece(TokenId id) const override {
    if (id < 0 || id >= sp_.GetPieceSize()) return {};
    return sp_.IdToPiece(id);
  }
  std::optional<TokenId> token_id(std::string_view p) const override {
    const int id = sp_.PieceToId(p);
    if (id < 0 || sp_.IdToPiece(id) != p) return std::nullopt;
    return id;
  }
  int64_t vocab_size() const override { return sp_.GetPieceSize(); }
  std::optional<TokenId> bos_id() const override { return bos_; }
  std::optional<TokenId> eos_id() const override { return eos_; }
  bool is_special(TokenId id) const override {
    return id >= 0 && id < sp_.GetPieceSize() && (sp_.IsControl(id) || sp_.IsUnknown(id));
  }
  std::optional<std::string> chat_template() const override { return cfg_.chat_template; }

 private:
  TokenizerConfig cfg_;
  sentencepiece::SentencePieceProcessor sp_;
  AddedTokenMatcher specials_;
  std::optional<TokenId> bos_, eos_;
};

}  // namespace

std::unique_ptr<Tokenizer> load_sentencepiece(const std::filesystem::path& file, TokenizerConfig config) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(file, ec)) fail(file.string(), ": no such tokenizer file");
  return std::make_unique<SpmTokenizer>(file.string(), false, file.string(), std::move(config));
}

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_bytes, const std::string& source,
                                              TokenizerConfig config) {
  return std::make_unique<SpmTokenizer>(model_bytes, true, source, std::move(config));
}

}  // namespace qlora::tok
