// Recipe -> text: the resolved YAML written beside a run, and the training
// hash. Both walk the same list of entries, in the schema's order.
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <type_traits>
#include <variant>

#include "core/error.h"
#include "recipe/recipe.h"
#include "recipe/recipe_schema.h"

namespace qlora {
namespace {

using StringList = std::vector<std::string>;
using StringMap = std::vector<std::pair<std::string, std::string>>;
using IntMap = std::vector<std::pair<std::string, int64_t>>;
using NumberMap = std::vector<std::pair<std::string, double>>;
using Value = std::variant<int64_t, uint64_t, double, bool, std::string, StringList, StringMap, IntMap, NumberMap>;

struct Entry {
  std::string section, key;
  Value value;
};

// Every key of the recipe, in recipe_schema::sections() order.
std::vector<Entry> entries(const Recipe& r) {
  // data.val is files when there are any, else the held-out fraction.
  const Value val = r.data.val.empty() ? Value(r.data.val_fraction) : Value(r.data.val);
  std::vector<Entry> e{
      {"model", "path", r.model.path},
      {"model", "preset", r.model.preset},
      {"quant", "type", r.quant.type},
      {"quant", "block_size", r.quant.block_size},
      {"quant", "double_quant", r.quant.double_quant},
      {"lora", "rank", r.lora.rank},
      {"lora", "alpha", r.lora.alpha},
      {"lora", "dropout", r.lora.dropout},
      {"lora", "rslora", r.lora.rslora},
      {"lora", "targets", r.lora.targets},
      {"lora", "init", r.lora.init},
      {"lora", "rank_pattern", r.lora.rank_pattern},
      {"lora", "alpha_pattern", r.lora.alpha_pattern},
      {"lora", "dora", r.lora.dora},
      {"lora", "plus_lr_ratio", r.lora.plus_lr_ratio},
      {"data", "train", r.data.train},
      {"data", "val", val},
      {"data", "format", r.data.format},
      {"data", "fields", r.data.fields},
      {"data", "chat_template", r.data.chat_template},
      {"data", "seq_len", r.data.seq_len},
      {"data", "packing", r.data.packing},
      {"data", "train_on_inputs", r.data.train_on_inputs},
      {"data", "over_long", r.data.over_long},
      {"data", "on_bad_record", r.data.on_bad_record},
      {"data", "cache", r.data.cache},
      {"data", "threads", r.data.threads},
      {"train", "epochs", r.train.epochs},
      {"train", "max_steps", r.train.max_steps},
      {"train", "micro_batch", r.train.micro_batch},
      {"train", "grad_accum", r.train.grad_accum},
      {"train", "lr", r.train.lr},
      {"train", "schedule", r.train.schedule},
      {"train", "warmup", r.train.warmup},
      {"train", "min_lr_ratio", r.train.min_lr_ratio},
      {"train", "optimizer", r.train.optimizer},
      {"train", "weight_decay", r.train.weight_decay},
      {"train", "beta1", r.train.beta1},
      {"train", "beta2", r.train.beta2},
      {"train", "eps", r.train.eps},
      {"train", "momentum", r.train.momentum},
      {"train", "max_grad_norm", r.train.max_grad_norm},
      {"train", "checkpointing",
       r.train.checkpointing_auto ? Value(std::string("auto")) : Value(r.train.checkpointing)},
      {"train", "seed", r.train.seed},
      {"train", "eval_every", r.train.eval_every},
      {"train", "save_every", r.train.save_every},
      {"train", "keep_checkpoints", r.train.keep_checkpoints},
      {"device", "backend", r.device.backend},
      {"device", "memory_budget", r.device.memory_budget},
      {"device", "threads", r.device.threads},
      {"output", "dir", r.output.dir},
      {"output", "merge", r.output.merge},
      {"output", "gguf", r.output.gguf},
      {"logging", "every", r.logging.every},
      {"logging", "report", r.logging.report},
      {"logging", "sample_prompts", r.logging.sample_prompts},
      {"logging", "sample_max_new_tokens", r.logging.sample_max_new_tokens},
  };
  // The schema is the contract with the validator; a key missing from either
  // list is a programming error, caught by every round trip.
  size_t i = 0;
  for (const auto& s : recipe_schema::sections())
    for (const auto& k : s.keys) {
      if (i >= e.size() || e[i].section != s.name || e[i].key != k)
        fail("internal: recipe_to_yaml's keys disagree with the schema at ", s.name, ".", k);
      ++i;
    }
  if (i != e.size()) fail("internal: recipe_to_yaml writes keys the schema does not know");
  return e;
}

// Shortest text that reads back as the same double, always with a '.' or an
// exponent sign so YAML 1.1 readers (PyYAML) also see a float.
std::string number_text(double v) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, res.ptr);
  const size_t e = s.find('e');
  if (s.find('.') == std::string::npos) s.insert(e == std::string::npos ? s.size() : e, ".0");
  return s;
}

// ---- YAML ------------------------------------------------------------------

// Names and paths (nf4, cosine, /data/train.jsonl, builtin:tiny) are written
// plain for readability; anything YAML could read as another type, or that
// needs escaping, is double-quoted.
bool plain_safe(const std::string& s) {
  if (s.empty()) return false;
  const char c0 = s[0];
  if (!((c0 >= 'a' && c0 <= 'z') || (c0 >= 'A' && c0 <= 'Z') || c0 == '_' || c0 == '/')) return false;
  for (char c : s)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
          c == '.' || c == '/' || c == '-' || c == '+' || c == ':'))
      return false;
  if (s.back() == ':') return false;
  std::string lower;
  for (char c : s) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const char* word : {"true", "false", "null", "yes", "no", "on", "off", "y", "n"})
    if (lower == word) return false;
  return true;
}

void emit_string(YAML::Emitter& out, const std::string& s) {
  if (plain_safe(s))
    out << s;
  else
    out << YAML::DoubleQuoted << s;
}

void emit_value(YAML::Emitter& out, const Value& v) {
  std::visit(
      [&out](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, bool>) {
          out << (x ? "true" : "false");
        } else if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, uint64_t>) {
          out << std::to_string(x);
        } else if constexpr (std::is_same_v<T, double>) {
          out << number_text(x);
        } else if constexpr (std::is_same_v<T, std::string>) {
          emit_string(out, x);
        } else if constexpr (std::is_same_v<T, StringList>) {
          if (x.empty()) out << YAML::Flow;
          out << YAML::BeginSeq;
          for (const auto& s : x) emit_string(out, s);
          out << YAML::EndSeq;
        } else if constexpr (std::is_same_v<T, StringMap>) {
          if (x.empty()) out << YAML::Flow;
          out << YAML::BeginMap;
          for (const auto& [k, s] : x) {
            out << YAML::Key << k << YAML::Value;
            emit_string(out, s);
          }
          out << YAML::EndMap;
        } else {
          // rank_pattern / alpha_pattern, in their order (it decides which key wins).
          if (x.empty()) out << YAML::Flow;
          out << YAML::BeginMap;
          for (const auto& [k, n] : x) {
            out << YAML::Key;
            emit_string(out, k);
            out << YAML::Value;
            if constexpr (std::is_same_v<T, IntMap>)
              out << std::to_string(n);
            else
              out << number_text(n);
          }
          out << YAML::EndMap;
        }
      },
      v);
}

// ---- hash ------------------------------------------------------------------

// Keys that do not change what training computes: where things go, how often
// they are logged or saved, how long to go on (a run may be extended), and
// the device that computes it (the backends compute the same training).
bool hash_excluded(const Entry& e) {
  if (e.section == "output" || e.section == "logging" || e.section == "device") return true;
  const std::string p = e.section + "." + e.key;
  // Keys added after checkpoints existed enter the hash only when set, so a
  // run saved by an earlier version still resumes.
  if (p == "lora.rank_pattern" && std::get<IntMap>(e.value).empty()) return true;
  if (p == "lora.alpha_pattern" && std::get<NumberMap>(e.value).empty()) return true;
  if (p == "lora.dora" && !std::get<bool>(e.value)) return true;
  if (p == "lora.plus_lr_ratio" && std::get<double>(e.value) == 1.0) return true;
  for (const char* k : {"model.preset", "data.cache", "data.threads", "train.epochs", "train.max_steps",
                        "train.eval_every", "train.save_every", "train.keep_checkpoints"})
    if (p == k) return true;
  return false;
}

void quoted(std::string& out, const std::string& s) {
  out += '"';
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  out += '"';
}

std::string canonical_value(const Value& v) {
  std::string out;
  std::visit(
      [&out](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, bool>) {
          out = x ? "true" : "false";
        } else if constexpr (std::is_same_v<T, int64_t> || std::is_same_v<T, uint64_t>) {
          out = std::to_string(x);
        } else if constexpr (std::is_same_v<T, double>) {
          out = number_text(x);
        } else if constexpr (std::is_same_v<T, std::string>) {
          quoted(out, x);
        } else if constexpr (std::is_same_v<T, StringList>) {
          out = "[";
          for (size_t i = 0; i < x.size(); ++i) {
            if (i) out += ",";
            quoted(out, x[i]);
          }
          out += "]";
        } else if constexpr (std::is_same_v<T, IntMap> || std::is_same_v<T, NumberMap>) {
          // Patterns in their order: it decides which key wins.
          out = "{";
          for (size_t i = 0; i < x.size(); ++i) {
            if (i) out += ",";
            quoted(out, x[i].first);
            out += ":";
            if constexpr (std::is_same_v<T, IntMap>)
              out += std::to_string(x[i].second);
            else
              out += number_text(x[i].second);
          }
          out += "}";
        } else {
          // Field overrides are a set: their order in the file does not matter.
          StringMap sorted = x;
          std::sort(sorted.begin(), sorted.end());
          out = "{";
          for (size_t i = 0; i < sorted.size(); ++i) {
            if (i) out += ",";
            quoted(out, sorted[i].first);
            out += ":";
            quoted(out, sorted[i].second);
          }
          out += "}";
        }
      },
      v);
  return out;
}

}  // namespace

std::string recipe_to_yaml(const Recipe& r) {
  const std::vector<Entry> all = entries(r);
  YAML::Emitter out;
  out << YAML::BeginMap;
  for (size_t i = 0; i < all.size();) {
    const std::string& section = all[i].section;
    out << YAML::Key << section << YAML::Value << YAML::BeginMap;
    for (; i < all.size() && all[i].section == section; ++i) {
      out << YAML::Key << all[i].key << YAML::Value;
      emit_value(out, all[i].value);
    }
    out << YAML::EndMap;
  }
  out << YAML::EndMap;
  if (!out.good()) fail("internal: cannot write the recipe as YAML: ", out.GetLastError());
  return std::string("# qlora recipe, fully resolved (every key; see docs/recipes.md)\n") + out.c_str() +
         "\n";
}

std::string recipe_training_hash(const Recipe& r) {
  std::string text = "qlora-training-hash-v1\n";
  for (const Entry& e : entries(r)) {
    if (hash_excluded(e)) continue;
    text += e.section + "." + e.key + "=" + canonical_value(e.value) + "\n";
  }
  // FNV-1a 64: stable across platforms and releases, which std::hash is not.
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace qlora
