// tokenizer.ggml.* -> tokenizer.json / tokenizer.model + tokenizer_config.json.
// The pre-tokenizers are those of each family's published tokenizer.json
// (llama.cpp names them by tokenizer.ggml.pre); the SentencePiece model is a
// ModelProto written field by field (the protobuf wire format; Debian ships
// libsentencepiece without its generated message classes).
#include "tokenizer/gguf_vocab.h"

#include <cstring>
#include <unordered_set>

#include "core/error.h"
#include "tokenizer/loaders.h"

namespace qlora {

using nlohmann::json;

const char* const kLlama3SplitRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2SplitRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

namespace {

// Byte-level pre-tokenizers by tokenizer.ggml.pre, as each family's
// tokenizer.json writes them.
json byte_level(bool use_regex) {
  return {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}
json split_then_bytes(const char* regex) {
  return {
      {"type", "Sequence"},
      {"pretokenizers",
       json::array(
           {{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}},
            byte_level(false)})}};
}
constexpr const char* kSupportedPre = "smollm, llama-bpe, llama3, qwen2, gpt-2, default";

struct ByteLevelFamily {
  json normalizer;  // null or NFC
  json pre_tokenizer;
  bool ignore_merges;  // Llama 3 looks whole words up before merging
};

ByteLevelFamily byte_level_family(const std::string& pre, const std::string& file) {
  if (pre == "smollm")
    return {nullptr,
            {{"type", "Sequence"},
             {"pretokenizers",
              json::array({{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true)})}},
            false};
  if (pre == "llama-bpe" || pre == "llama3") return {nullptr, split_then_bytes(kLlama3SplitRegex), true};
  if (pre == "qwen2") return {{{"type", "NFC"}}, split_then_bytes(kQwen2SplitRegex), false};
  if (pre == "gpt-2" || pre == "gpt2" || pre == "default") return {nullptr, byte_level(true), false};
  fail(file, ": key tokenizer.ggml.pre \"", pre, "\" is not supported (supported: ", kSupportedPre, ")");
}

// ---- protobuf wire format, just what a ModelProto needs ----
void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(char(uint8_t(v) | 0x80));
    v >>= 7;
  }
  out.push_back(char(v));
}
void put_tag(std::string& out, int field, int wire) {
  put_varint(out, uint64_t(field) << 3 | uint64_t(wire));
}
void put_int(std::string& out, int field, int64_t v) {  // int32/enum/bool: negatives as 10-byte varints
  put_tag(out, field, 0);
  put_varint(out, uint64_t(v));
}
void put_bytes(std::string& out, int field, const std::string& b) {
  put_tag(out, field, 2);
  put_varint(out, b.size());
  out += b;
}
void put_float(std::string& out, int field, float f) {
  put_tag(out, field, 5);
  char b[4];
  std::memcpy(b, &f, 4);  // little-endian, as the wire format
  out.append(b, 4);
}

// A SentencePiece BPE model with the file's pieces. Llama 2 / Mistral
// settings: byte fallback, dummy prefix as tokenizer.ggml.add_space_prefix
// says, no whitespace folding, "identity" normalization.
std::string spm_model(const GgufFile& f, const std::vector<std::string>& tokens,
                      const std::vector<double>& scores, const std::vector<int64_t>& types) {
  std::string out;
  for (size_t i = 0; i < tokens.size(); ++i) {
    std::string piece;
    put_bytes(piece, 1, tokens[i]);
    put_float(piece, 2, float(scores[i]));
    if (types[i] != GgufTokenType::kNormal) put_int(piece, 3, types[i]);
    put_bytes(out, 1, piece);
  }
  auto id = [&](const char* key, int64_t def) { return f.find(key) ? f.get_int(key) : def; };
  std::string trainer;
  put_int(trainer, 3, 2);  // model_type BPE
  put_int(trainer, 4, int64_t(tokens.size()));
  put_int(trainer, 35, 1);  // byte_fallback
  put_int(trainer, 40, id("tokenizer.ggml.unknown_token_id", 0));
  put_int(trainer, 41, id("tokenizer.ggml.bos_token_id", 1));
  put_int(trainer, 42, id("tokenizer.ggml.eos_token_id", 2));
  put_int(trainer, 43, id("tokenizer.ggml.padding_token_id", -1));
  put_bytes(out, 2, trainer);
  const bool prefix =
      f.find("tokenizer.ggml.add_space_prefix") ? f.get_bool("tokenizer.ggml.add_space_prefix") : true;
  std::string norm;
  put_bytes(norm, 1, "identity");
  put_int(norm, 3, prefix ? 1 : 0);  // add_dummy_prefix
  put_int(norm, 4, 0);               // remove_extra_whitespaces
  put_int(norm, 5, 1);               // escape_whitespaces
  put_bytes(out, 3, norm);
  return out;
}

}  // namespace

GgufTokenizerFiles gguf_tokenizer_files(const GgufFile& f) {
  const std::string file = f.path().string();
  if (!f.find("tokenizer.ggml.model"))
    fail(file, ": no tokenizer in the metadata (key tokenizer.ggml.model is missing)");
  const std::string model = f.get_string("tokenizer.ggml.model");
  // Counted before the strings are copied: a vocabulary over kMaxVocabSize
  // is refused by name, never sized into tables.
  const GgufValue* listed = f.find("tokenizer.ggml.tokens");
  if (const auto* a = listed ? std::get_if<GgufArray>(&listed->v) : nullptr;
      a && a->items.size() > size_t(kMaxVocabSize))
    fail(file, ": key tokenizer.ggml.tokens has ", a->items.size(), " tokens; a vocabulary has at most ",
         kMaxVocabSize);
  const std::vector<std::string> tokens = f.get_string_array("tokenizer.ggml.tokens");
  if (tokens.empty()) fail(file, ": key tokenizer.ggml.tokens is empty");
  std::vector<int64_t> types(tokens.size(), GgufTokenType::kNormal);
  if (f.find("tokenizer.ggml.token_type")) {
    types = f.get_int_array("tokenizer.ggml.token_type");
    if (types.size() != tokens.size())
      fail(file, ": key tokenizer.ggml.token_type has ", types.size(),
           " entries but tokenizer.ggml.tokens has ", tokens.size());
  }
  auto token_of = [&](const char* key) -> json {
    if (!f.find(key)) return nullptr;
    const int64_t id = f.get_int(key);
    if (id < 0 || id >= int64_t(tokens.size()))
      fail(file, ": key ", key, " is ", id, ", outside the vocabulary of ", tokens.size(), " tokens");
    return tokens[size_t(id)];
  };

  GgufTokenizerFiles out;
  json& cfg = out.tokenizer_config;
  cfg["bos_token"] = token_of("tokenizer.ggml.bos_token_id");
  cfg["eos_token"] = token_of("tokenizer.ggml.eos_token_id");
  cfg["unk_token"] = token_of("tokenizer.ggml.unknown_token_id");
  cfg["pad_token"] = token_of("tokenizer.ggml.padding_token_id");
  // llama.cpp's defaults when the flags are absent: SentencePiece vocabularies add BOS, byte-level ones do
  // not.
  const bool spm = model == "llama";
  cfg["add_bos_token"] =
      f.find("tokenizer.ggml.add_bos_token") ? f.get_bool("tokenizer.ggml.add_bos_token") : spm;
  cfg["add_eos_token"] =
      f.find("tokenizer.ggml.add_eos_token") ? f.get_bool("tokenizer.ggml.add_eos_token") : false;
  if (f.find("tokenizer.chat_template")) cfg["chat_template"] = f.get_string("tokenizer.chat_template");
  cfg["tokenizer_class"] = spm ? "LlamaTokenizer" : "PreTrainedTokenizerFast";

  if (spm) {
    std::vector<double> scores(tokens.size(), 0.0);
    if (f.find("tokenizer.ggml.scores")) scores = f.get_float_array("tokenizer.ggml.scores");
    if (scores.size() != tokens.size())
      fail(file, ": key tokenizer.ggml.scores has ", scores.size(), " entries but tokenizer.ggml.tokens has ",
           tokens.size());
    out.spm_model = spm_model(f, tokens, scores, types);
    return out;
  }
  if (model != "gpt2")
    fail(file, ": key tokenizer.ggml.model \"", model, "\" is not supported (supported: gpt2, llama)");

  const std::string pre = f.find("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "default";
  const ByteLevelFamily fam = byte_level_family(pre, file);
  json vocab = json::object();
  json added = json::array();
  for (size_t id = 0; id < tokens.size(); ++id) {
    // A duplicate string keeps its first id, as a tokenizer.json vocabulary would.
    if (!vocab.contains(tokens[id])) vocab[tokens[id]] = int64_t(id);
    if (types[id] == GgufTokenType::kControl || types[id] == GgufTokenType::kUserDefined)
      added.push_back({{"id", int64_t(id)},
                       {"content", tokens[id]},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", types[id] == GgufTokenType::kUserDefined},
                       {"special", types[id] == GgufTokenType::kControl}});
  }
  json merges = json::array();
  if (f.find("tokenizer.ggml.merges"))
    for (std::string& m : f.get_string_array("tokenizer.ggml.merges")) merges.push_back(std::move(m));
  out.tokenizer_json = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", fam.normalizer},
      {"pre_tokenizer", fam.pre_tokenizer},
      {"post_processor",
       {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}}},
      {"decoder",
       {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", fam.ignore_merges},
        {"vocab", vocab},
        {"merges", merges}}},
  };
  return out;
}

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const GgufFile& f) {
  GgufTokenizerFiles files = gguf_tokenizer_files(f);
  const std::string source = f.path().string();
  tok::TokenizerConfig cfg = tok::parse_tokenizer_config(files.tokenizer_config, source);
  if (!files.spm_model.empty()) return tok::load_sentencepiece(files.spm_model, source, std::move(cfg));
  return tok::load_tokenizer_json(files.tokenizer_json, source, std::move(cfg));
}

}  // namespace qlora
