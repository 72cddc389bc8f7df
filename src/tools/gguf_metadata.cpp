// config.json / tokenizer files -> GGUF metadata. The token and pre-tokenizer
// conventions are those tokenizer/gguf_vocab.cpp reads back (and llama.cpp's
// converter writes); tests/test_gguf_export.cpp checks the round trips.
#include "tools/gguf_metadata.h"

#include <sentencepiece_processor.h>

#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numbers>
#include <optional>

#include "core/error.h"
#include "core/json_integer.h"
#include "core/json_parse.h"
#include "tokenizer/gguf_vocab.h"

namespace qlora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

GgufValue u32(int64_t v) {
  return {GgufType::U32, uint64_t(v)};
}
GgufValue f32(double v) {
  return {GgufType::F32, double(float(v))};
}
GgufValue gstr(std::string s) {
  return {GgufType::STRING, std::move(s)};
}
GgufValue boolean(bool b) {
  return {GgufType::BOOL, b};
}
GgufValue string_array(std::vector<std::string> v) {
  GgufArray a{GgufType::STRING, {}};
  a.items.reserve(v.size());
  for (std::string& s : v) a.items.push_back(gstr(std::move(s)));
  return {GgufType::ARRAY, std::move(a)};
}
GgufValue i32_array(const std::vector<int64_t>& v) {
  GgufArray a{GgufType::I32, {}};
  a.items.reserve(v.size());
  for (int64_t x : v) a.items.push_back({GgufType::I32, x});
  return {GgufType::ARRAY, std::move(a)};
}
GgufValue f32_array(const std::vector<float>& v) {
  GgufArray a{GgufType::F32, {}};
  a.items.reserve(v.size());
  for (float x : v) a.items.push_back({GgufType::F32, double(x)});
  return {GgufType::ARRAY, std::move(a)};
}

json read_json(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail("cannot open ", file.string());
  try {
    return parse_json(in, file.string());
  } catch (const json::exception& e) {
    fail(file.string(), ": invalid JSON: ", e.what());
  }
}

// ---- byte-level BPE (tokenizer.json) ----

constexpr const char* kSupportedPre =
    "gpt-2 (ByteLevel), smollm (Digits + ByteLevel), llama-bpe (Llama 3's Split + ByteLevel), "
    "qwen2 (NFC + Qwen2's Split + ByteLevel)";

bool is_byte_level(const json& p, bool use_regex) {
  return p.is_object() && p.value("type", "") == "ByteLevel" && !p.value("add_prefix_space", false) &&
         p.value("use_regex", true) == use_regex;
}

// Whether the tokenizer.json is a byte-level BPE at all (then any mismatch
// below is an unsupported variant rather than another kind of tokenizer).
bool uses_byte_level(const json& pre) {
  if (!pre.is_object()) return false;
  if (pre.value("type", "") == "ByteLevel") return true;
  if (pre.value("type", "") == "Sequence" && pre.contains("pretokenizers"))
    for (const json& p : pre["pretokenizers"])
      if (p.is_object() && p.value("type", "") == "ByteLevel") return true;
  return false;
}

// tokenizer.ggml.pre for a byte-level tokenizer.json: the family whose
// normalizer and pre-tokenizer gguf_vocab.cpp rebuilds exactly.
std::string byte_level_pre(const json& tj, const fs::path& file) {
  const json pre = tj.value("pre_tokenizer", json());
  const json norm = tj.value("normalizer", json());
  const bool nfc = norm.is_object() && norm.value("type", "") == "NFC";
  if (norm.is_null() && is_byte_level(pre, true)) return "gpt-2";
  if (pre.is_object() && pre.value("type", "") == "Sequence" && pre.contains("pretokenizers") &&
      pre["pretokenizers"].is_array() && pre["pretokenizers"].size() == 2) {
    const json& a = pre["pretokenizers"][0];
    const json& b = pre["pretokenizers"][1];
    if (norm.is_null() && a.value("type", "") == "Digits" && a.value("individual_digits", false) &&
        is_byte_level(b, true))
      return "smollm";
    if (a.value("type", "") == "Split" && a.value("behavior", "") == "Isolated" &&
        !a.value("invert", false) && a.contains("pattern") && a["pattern"].is_object() &&
        a["pattern"].contains("Regex") && is_byte_level(b, false)) {
      const std::string re = a["pattern"]["Regex"].get<std::string>();
      if (norm.is_null() && re == kLlama3SplitRegex) return "llama-bpe";
      if (nfc && re == kQwen2SplitRegex) return "qwen2";
    }
  }
  fail(file.string(), ": the pre-tokenizer ", pre.dump(),
       (norm.is_null() ? "" : " with normalizer " + norm.dump()),
       " has no llama.cpp equivalent that qlora writes (supported: ", kSupportedPre, ")");
}

std::string merge_string(const json& m, const fs::path& file) {
  if (m.is_string()) return m.get<std::string>();
  if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string())
    return m[0].get<std::string>() + " " + m[1].get<std::string>();
  fail(file.string(), ": model.merges entry ", m.dump(), " is neither \"a b\" nor [\"a\", \"b\"]");
}

// ---- SentencePiece (tokenizer.model) ----

// NormalizerSpec.add_dummy_prefix (ModelProto field 3, its field 3; default
// true), read from the protobuf wire format: the Debian library has no
// generated message classes.
bool spm_add_dummy_prefix(const std::string& proto, const fs::path& file) {
  auto varint = [&](const std::string& s, size_t& i) -> uint64_t {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (i >= s.size()) fail(file.string(), ": truncated SentencePiece model");
      const uint8_t b = uint8_t(s[i++]);
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    fail(file.string(), ": malformed SentencePiece model (varint too long)");
  };
  // Calls f(field, wire, value, bytes) for each field of `s`; value holds varints, bytes LEN payloads.
  auto fields = [&](const std::string& s, auto&& f) {
    size_t i = 0;
    while (i < s.size()) {
      const uint64_t tag = varint(s, i);
      const int field = int(tag >> 3), wire = int(tag & 7);
      uint64_t value = 0;
      std::string_view bytes;
      if (wire == 0) {
        value = varint(s, i);
      } else if (wire == 1 || wire == 5) {
        const size_t n = wire == 1 ? 8 : 4;
        if (s.size() - i < n) fail(file.string(), ": truncated SentencePiece model");
        i += n;
      } else if (wire == 2) {
        const uint64_t n = varint(s, i);
        if (n > s.size() - i) fail(file.string(), ": truncated SentencePiece model");
        bytes = std::string_view(s).substr(i, size_t(n));
        i += size_t(n);
      } else {
        fail(file.string(), ": malformed SentencePiece model (wire type ", wire, ")");
      }
      f(field, wire, value, bytes);
    }
  };
  bool add = true;
  fields(proto, [&](int field, int wire, uint64_t, std::string_view bytes) {
    if (field != 3 || wire != 2) return;
    fields(std::string(bytes), [&](int f2, int w2, uint64_t v, std::string_view) {
      if (f2 == 3 && w2 == 0) add = v != 0;
    });
  });
  return add;
}

struct Vocab {
  std::string model;  // "gpt2" | "llama"
  std::vector<std::string> tokens;
  std::vector<int64_t> types;
  std::vector<float> scores;  // llama only
  std::vector<std::string> merges;
  std::string pre;
  std::optional<bool> add_space_prefix;
  std::optional<int64_t> bos, eos, unk, pad;  // from the tokenizer itself
  std::optional<bool> add_bos, add_eos;       // from tokenizer.json's post-processor
};

// The first SpecialToken of a TemplateProcessing (inside a Sequence too), and whether one ends it.
void post_processor_specials(const json& pp, std::optional<std::string>& first,
                             std::optional<std::string>& last) {
  if (!pp.is_object()) return;
  if (pp.value("type", "") == "Sequence" && pp.contains("processors")) {
    for (const json& p : pp["processors"]) post_processor_specials(p, first, last);
    return;
  }
  if (pp.value("type", "") != "TemplateProcessing" || !pp.contains("single") || !pp["single"].is_array())
    return;
  const json& s = pp["single"];
  if (s.empty()) return;
  if (s.front().contains("SpecialToken")) first = s.front()["SpecialToken"].value("id", "");
  if (s.size() > 1 && s.back().contains("SpecialToken")) last = s.back()["SpecialToken"].value("id", "");
}

Vocab byte_level_vocab(const fs::path& file, const json& tj, int64_t n_vocab) {
  Vocab v;
  v.model = "gpt2";
  const json& m = tj.value("model", json());
  if (!m.is_object() || m.value("type", "") != "BPE" || m.value("byte_fallback", false))
    fail(file.string(), ": model.type must be a BPE without byte_fallback for a byte-level tokenizer");
  v.pre = byte_level_pre(tj, file);
  // Ids are integers in [0, kMaxVocabSize): they size the token list below.
  const auto id_of = [&](const json& id, const std::string& what) {
    return json_integer_in(id, file.string() + ": " + what, 0, kMaxVocabSize - 1);
  };
  std::map<int64_t, std::pair<std::string, int64_t>> by_id;  // id -> (text, type)
  for (const auto& [text, id] : m.at("vocab").items())
    by_id[id_of(id, "vocab entry '" + text + "'")] = {text, GgufTokenType::kNormal};
  if (tj.contains("added_tokens"))
    for (const json& t : tj["added_tokens"]) {
      const std::string content = t.at("content").get<std::string>();
      by_id[id_of(t.at("id"), "added token '" + content + "' id")] = {
          content, t.value("special", false) ? GgufTokenType::kControl : GgufTokenType::kUserDefined};
    }
  if (by_id.empty()) fail(file.string(), ": empty vocabulary");
  const int64_t size = by_id.rbegin()->first + 1;
  if (n_vocab == 0) n_vocab = size;
  if (n_vocab > kMaxVocabSize)
    fail(file.string(), ": the model has ", n_vocab, " embedding rows; a vocabulary has at most ",
         kMaxVocabSize);
  if (size > n_vocab)
    fail(file.string(), ": the tokenizer has token id ", size - 1, " but the model has only ", n_vocab,
         " embedding rows (vocab_size)");
  for (int64_t id = 0; id < n_vocab; ++id) {
    auto it = by_id.find(id);
    v.tokens.push_back(it != by_id.end() ? it->second.first : "[PAD" + std::to_string(id) + "]");
    v.types.push_back(it != by_id.end() ? it->second.second : GgufTokenType::kUnused);
  }
  if (m.contains("merges"))
    for (const json& mg : m["merges"]) v.merges.push_back(merge_string(mg, file));
  std::optional<std::string> first, last;
  post_processor_specials(tj.value("post_processor", json()), first, last);
  v.add_bos = first.has_value();
  v.add_eos = last.has_value();
  return v;
}

Vocab sentencepiece_vocab(const fs::path& file, int64_t n_vocab) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail("cannot open ", file.string());
  const std::string proto((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  sentencepiece::SentencePieceProcessor sp;
  if (const auto st = sp.LoadFromSerializedProto(proto); !st.ok())
    fail(file.string(), ": cannot load SentencePiece model: ", st.ToString());
  Vocab v;
  v.model = "llama";
  v.pre = "default";
  const int64_t size = sp.GetPieceSize();
  if (n_vocab == 0) n_vocab = size;
  if (n_vocab > kMaxVocabSize)
    fail(file.string(), ": the model has ", n_vocab, " embedding rows; a vocabulary has at most ",
         kMaxVocabSize);
  if (size > n_vocab)
    fail(file.string(), ": the tokenizer has ", size, " pieces but the model has only ", n_vocab,
         " embedding rows (vocab_size)");
  for (int id = 0; id < int(n_vocab); ++id) {
    if (id >= size) {  // rows beyond the pieces: placeholders, as llama.cpp's converter pads
      v.tokens.push_back("[PAD" + std::to_string(id) + "]");
      v.scores.push_back(-1000.0f);
      v.types.push_back(GgufTokenType::kUnused);
      continue;
    }
    v.tokens.push_back(sp.IdToPiece(id));
    v.scores.push_back(sp.GetScore(id));
    v.types.push_back(sp.IsUnknown(id)   ? GgufTokenType::kUnknown
                      : sp.IsControl(id) ? GgufTokenType::kControl
                      : sp.IsUnused(id)  ? GgufTokenType::kUnused
                      : sp.IsByte(id)    ? GgufTokenType::kByte
                                         : GgufTokenType::kNormal);
  }
  v.add_space_prefix = spm_add_dummy_prefix(proto, file);
  auto id_or_none = [](int id) { return id >= 0 ? std::optional<int64_t>(id) : std::nullopt; };
  v.bos = id_or_none(sp.bos_id());
  v.eos = id_or_none(sp.eos_id());
  v.unk = id_or_none(sp.unk_id());
  v.pad = id_or_none(sp.pad_id());
  return v;
}

// bos_token / eos_token / ... of tokenizer_config.json: a string or an AddedToken object.
std::optional<std::string> config_token(const json& tc, const char* key) {
  if (!tc.contains(key)) return std::nullopt;
  const json& t = tc[key];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_object() && t.contains("content") && t["content"].is_string())
    return t["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

std::string gguf_architecture(Arch a) {
  switch (a) {
    case Arch::Llama:
    case Arch::Mistral:
      return "llama";
    case Arch::Qwen2:
      return "qwen2";
    case Arch::Qwen3:
      return "qwen3";  // llama.cpp's LLM_ARCH_QWEN3: attn_q_norm/attn_k_norm, NeoX RoPE (no q/k interleaving)
  }
  fail("internal: no GGUF architecture for ", arch_name(a));
}

GgufKeyValues gguf_model_metadata(const ModelConfig& cfg) {
  const std::string arch = gguf_architecture(cfg.arch);
  const std::string p = arch + ".";
  GgufKeyValues kv;
  kv.emplace_back("general.architecture", gstr(arch));
  if (cfg.max_position_embeddings > 0)
    kv.emplace_back(p + "context_length", u32(cfg.max_position_embeddings));
  kv.emplace_back(p + "embedding_length", u32(cfg.hidden_size));
  kv.emplace_back(p + "feed_forward_length", u32(cfg.intermediate_size));
  kv.emplace_back(p + "block_count", u32(cfg.num_hidden_layers));
  kv.emplace_back(p + "attention.head_count", u32(cfg.num_attention_heads));
  kv.emplace_back(p + "attention.head_count_kv", u32(cfg.num_key_value_heads));
  kv.emplace_back(p + "attention.key_length", u32(cfg.head_dim));
  kv.emplace_back(p + "attention.value_length", u32(cfg.head_dim));
  kv.emplace_back(p + "attention.layer_norm_rms_epsilon", f32(cfg.rms_norm_eps));
  kv.emplace_back(p + "rope.dimension_count", u32(cfg.head_dim));
  kv.emplace_back(p + "rope.freq_base", f32(cfg.rope_theta));
  kv.emplace_back(p + "vocab_size", u32(cfg.vocab_size));
  if (cfg.rope_scaling.type == RopeScalingType::Linear) {
    kv.emplace_back(p + "rope.scaling.type", gstr("linear"));
    kv.emplace_back(p + "rope.scaling.factor", f32(cfg.rope_scaling.factor));
  }
  return kv;
}

uint32_t gguf_file_type(GgmlType t) {
  switch (t) {
    case GgmlType::F32:
      return 0;
    case GgmlType::F16:
      return 1;
    case GgmlType::Q8_0:
      return 7;
    case GgmlType::BF16:
      return 32;
    default:
      fail("internal: no general.file_type for ", ggml_type_name(t));
  }
}

std::vector<float> gguf_rope_freqs(const ModelConfig& cfg) {
  const RopeScaling& rs = cfg.rope_scaling;
  if (rs.type != RopeScalingType::Llama3) return {};
  // transformers' llama3 rule: wavelengths below old_ctx / high keep their
  // frequency, above old_ctx / low are divided by factor, and in between a
  // smooth mix; llama.cpp divides each frequency by the stored factor.
  const double old_ctx = double(rs.original_max_position_embeddings);
  std::vector<float> out;
  for (int64_t j = 0; j < cfg.head_dim / 2; ++j) {
    const double freq = 1.0 / std::pow(cfg.rope_theta, double(2 * j) / double(cfg.head_dim));
    const double wavelen = 2.0 * std::numbers::pi / freq;
    double f = 1.0;
    if (wavelen > old_ctx / rs.low_freq_factor) {
      f = rs.factor;
    } else if (wavelen >= old_ctx / rs.high_freq_factor) {
      const double smooth =
          (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
      f = 1.0 / ((1.0 - smooth) / rs.factor + smooth);
    }
    out.push_back(float(f));
  }
  return out;
}

GgufKeyValues gguf_tokenizer_metadata(const fs::path& dir, const ModelConfig& cfg) {
  const fs::path tj_file = dir / "tokenizer.json", spm_file = dir / "tokenizer.model";
  std::optional<json> tj;
  if (fs::exists(tj_file)) tj = read_json(tj_file);
  Vocab v;
  if (tj && uses_byte_level(tj->value("pre_tokenizer", json()))) {
    v = byte_level_vocab(tj_file, *tj, cfg.vocab_size);
  } else if (fs::exists(spm_file)) {
    v = sentencepiece_vocab(spm_file, cfg.vocab_size);
  } else if (tj) {
    fail(tj_file.string(), ": not a byte-level BPE tokenizer, and there is no tokenizer.model beside it: ",
         "llama.cpp's GGUF needs one or the other (supported byte-level pre-tokenizers: ", kSupportedPre,
         ")");
  } else {
    fail(dir.string(), ": no tokenizer.json or tokenizer.model to write into the GGUF file");
  }

  json tc = json::object();
  if (fs::exists(dir / "tokenizer_config.json")) tc = read_json(dir / "tokenizer_config.json");
  // Added tokens declared only in tokenizer_config.json (SentencePiece
  // models): their ids are CONTROL (special) or USER_DEFINED.
  if (tc.contains("added_tokens_decoder") && tc["added_tokens_decoder"].is_object() && v.model == "llama")
    for (const auto& [key, t] : tc["added_tokens_decoder"].items()) {
      const int64_t id = std::stoll(key);
      if (id < 0 || id >= int64_t(v.tokens.size()) || !t.contains("content")) continue;
      if (v.types[size_t(id)] == GgufTokenType::kNormal || v.types[size_t(id)] == GgufTokenType::kUnused) {
        v.tokens[size_t(id)] = t["content"].get<std::string>();
        v.types[size_t(id)] =
            t.value("special", false) ? GgufTokenType::kControl : GgufTokenType::kUserDefined;
      }
    }
  auto id_of = [&](const std::string& text) -> std::optional<int64_t> {
    for (size_t i = 0; i < v.tokens.size(); ++i)
      if (v.tokens[i] == text && v.types[i] != GgufTokenType::kUnused) return int64_t(i);
    return std::nullopt;
  };
  auto token_id = [&](const char* key, std::optional<int64_t> fallback) -> std::optional<int64_t> {
    if (auto t = config_token(tc, key)) {
      if (auto id = id_of(*t)) return id;
      fail((dir / "tokenizer_config.json").string(), ": ", key, " \"", *t, "\" is not in the vocabulary");
    }
    return fallback;
  };
  const auto first = [](const std::vector<int64_t>& ids) {
    return ids.empty() ? std::nullopt : std::optional<int64_t>(ids.front());
  };
  const std::optional<int64_t> bos =
      token_id("bos_token", first(cfg.bos_token_ids) ? first(cfg.bos_token_ids) : v.bos);
  const std::optional<int64_t> eos =
      token_id("eos_token", first(cfg.eos_token_ids) ? first(cfg.eos_token_ids) : v.eos);
  const std::optional<int64_t> unk = token_id("unk_token", v.unk);
  const std::optional<int64_t> pad = token_id("pad_token", v.pad);
  // config.json's other end-of-sequence ids (Llama 3.1: end_of_text, eom, eot) stop generation too.
  std::optional<int64_t> eot, eom;
  for (int64_t id : cfg.eos_token_ids) {
    if (id == eos || id < 0 || id >= int64_t(v.tokens.size())) continue;
    if (v.tokens[size_t(id)] == "<|eom_id|>" && !eom)
      eom = id;
    else if (!eot)
      eot = id;
  }
  const bool add_bos = tc.contains("add_bos_token") && tc["add_bos_token"].is_boolean()
                           ? tc["add_bos_token"].get<bool>()
                           : v.add_bos.value_or(v.model == "llama");
  const bool add_eos = tc.contains("add_eos_token") && tc["add_eos_token"].is_boolean()
                           ? tc["add_eos_token"].get<bool>()
                           : v.add_eos.value_or(false);
  std::optional<std::string> chat_template;
  if (tc.contains("chat_template")) {
    const json& t = tc["chat_template"];
    if (t.is_string()) chat_template = t.get<std::string>();
    if (t.is_array())  // named templates: the default one (else the first)
      for (const json& e : t)
        if (e.is_object() && e.contains("template") && (!chat_template || e.value("name", "") == "default"))
          chat_template = e["template"].get<std::string>();
  }
  if (!chat_template && fs::exists(dir / "chat_template.jinja")) {
    std::ifstream in(dir / "chat_template.jinja", std::ios::binary);
    chat_template = std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }

  GgufKeyValues kv;
  kv.emplace_back("tokenizer.ggml.model", gstr(v.model));
  kv.emplace_back("tokenizer.ggml.pre", gstr(v.pre));
  kv.emplace_back("tokenizer.ggml.tokens", string_array(v.tokens));
  if (v.model == "llama") kv.emplace_back("tokenizer.ggml.scores", f32_array(v.scores));
  kv.emplace_back("tokenizer.ggml.token_type", i32_array(v.types));
  if (v.model == "gpt2") kv.emplace_back("tokenizer.ggml.merges", string_array(v.merges));
  if (v.add_space_prefix) kv.emplace_back("tokenizer.ggml.add_space_prefix", boolean(*v.add_space_prefix));
  const int64_t n = int64_t(v.tokens.size());
  auto add_id = [&](const char* key, std::optional<int64_t> id) {
    if (!id) return;
    if (*id < 0 || *id >= n)
      fail(dir.string(), ": ", key, " ", *id, " is outside the vocabulary of ", n, " tokens");
    kv.emplace_back(key, u32(*id));
  };
  add_id("tokenizer.ggml.bos_token_id", bos);
  add_id("tokenizer.ggml.eos_token_id", eos);
  add_id("tokenizer.ggml.eot_token_id", eot);
  add_id("tokenizer.ggml.eom_token_id", eom);
  add_id("tokenizer.ggml.unknown_token_id", unk);
  add_id("tokenizer.ggml.padding_token_id", pad);
  kv.emplace_back("tokenizer.ggml.add_bos_token", boolean(add_bos));
  kv.emplace_back("tokenizer.ggml.add_eos_token", boolean(add_eos));
  if (chat_template) kv.emplace_back("tokenizer.chat_template", gstr(*chat_template));
  return kv;
}

GgufKeyValues gguf_tokenizer_metadata(const GgufFile& f) {
  GgufKeyValues kv;
  for (const auto& [key, value] : f.metadata())
    if (key.rfind("tokenizer.", 0) == 0) kv.emplace_back(key, value);
  if (kv.empty()) fail(f.path().string(), ": no tokenizer.* keys to copy (the file carries no tokenizer)");
  return kv;
}

}  // namespace qlora
