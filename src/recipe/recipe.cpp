// Recipe loading: YAML text -> checked tree (syntax, duplicate keys, unknown
// keys) -> overrides applied -> typed, range-checked Recipe -> paths resolved.
// Every message starts with where the value came from: "<file>:<line>:<col>"
// (1-based; yaml-cpp's marks are 0-based) or "override '<text>'".
#include "recipe/recipe.h"

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <sstream>
#include <utility>

#include "core/error.h"
#include "data/chat_template.h"
#include "data/dataset_reader.h"
#include "recipe/byte_size.h"
#include "recipe/recipe_schema.h"

namespace qlora {

namespace {

// The line (1-based) of a document whose first token is ',', or 0. yaml-cpp
// 0.7 loops forever, allocating, on such a document (",a:" alone does it;
// found by fuzz/fuzz_recipe; count_documents below covers every case, this
// gives the commonest its own message). A
// document starts at the top, after a "---" line (the rest of that line
// included) and after a "..." line.
size_t comma_starting_a_document(const std::string& yaml) {
  bool at_start = true;
  size_t line_no = 0;
  std::istringstream in(yaml);
  for (std::string line; std::getline(in, line);) {
    ++line_no;
    std::string_view rest = line;
    if (rest.rfind("---", 0) == 0 || rest.rfind("...", 0) == 0) {
      at_start = true;
      rest.remove_prefix(3);
    }
    const size_t first = rest.find_first_not_of(" \t\r");
    if (first == std::string_view::npos || rest[first] == '#') continue;
    if (at_start && rest[first] == '%') continue;  // a directive
    if (at_start && rest[first] == ',') return line_no;
    at_start = false;
  }
  return 0;
}

// yaml-cpp 0.7's LoadAll loops forever, allocating, when its parser stops at
// a ',' that follows a document's top-level value ("!x ,a", "[a] ,b",
// "- a\n,b"; found by fuzz/fuzz_recipe): HandleNextDocument returns an empty
// document without consuming the token, and LoadAll asks for the next one
// again. So documents are counted here with the parser itself, building
// nothing, and a document that starts where the previous one did is an
// error. Valid YAML never does that (each document consumes a token), so no
// valid recipe is refused; YAML::Load then reads the one document.
class DocumentStarts final : public YAML::EventHandler {
 public:
  std::vector<YAML::Mark> starts;
  void OnDocumentStart(const YAML::Mark& m) override { starts.push_back(m); }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {
  }
  void OnMapEnd() override {}
};

size_t count_documents(const std::string& yaml, const std::string& name) {
  std::istringstream in(yaml);
  YAML::Parser parser(in);
  DocumentStarts h;
  while (parser.HandleNextDocument(h)) {
    const auto& s = h.starts;
    if (s.size() >= 2 && s[s.size() - 1].pos == s[s.size() - 2].pos) {
      const YAML::Mark& m = s.back();
      fail(name, ":", m.line + 1, ":", m.column + 1, ": invalid YAML: '", yaml.substr(size_t(m.pos), 1),
           "' after the document's value (or at its start)");
    }
  }
  return h.starts.size();
}

}  // namespace

namespace {

namespace schema = recipe_schema;
using YAML::Node;

// Where values came from, for messages.
struct Source {
  std::string name;  // the file
  // Applied overrides in order: key path, the override's text.
  std::vector<std::pair<std::string, std::string>> overrides;

  // The latest override whose key path is `path` or a parent of it set the
  // value; otherwise the file did, at `mark`.
  std::string where(const std::string& path, const YAML::Mark& mark) const {
    for (auto it = overrides.rbegin(); it != overrides.rend(); ++it) {
      const std::string& p = it->first;
      if (path == p || (path.size() > p.size() && path.compare(0, p.size(), p) == 0 &&
                        (path[p.size()] == '.' || path[p.size()] == '[')))
        return "override '" + it->second + "'";
    }
    if (mark.is_null()) return name;
    return str(name, ":", mark.line + 1, ":", mark.column + 1);
  }

  [[noreturn]] void error(const std::string& path, const YAML::Mark& mark, const std::string& what) const {
    fail(where(path, mark), ": ", what);
  }
};

// One value of the tree with its key path and position.
struct Item {
  std::string path;  // "lora.rank", "data.train[1]"
  Node node;
  YAML::Mark mark;  // the value's position, or its key's when the value is empty
};

// How a value is shown after "got".
std::string describe(const Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Null:
      return "nothing (null)";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    default:
      return "'" + n.Scalar() + "'";
  }
}

[[noreturn]] void expected(const Source& src, const Item& it, const std::string& what) {
  src.error(it.path, it.mark, it.path + ": expected " + what + ", got " + describe(it.node));
}

// ---- scalars ---------------------------------------------------------------

// Integers in decimal only: "1.5", "1e3", "0x10" and "abc" are not integers here.
template <typename T>
std::optional<T> scalar_integer(const Node& n) {
  if (!n.IsScalar()) return std::nullopt;
  std::string_view s = n.Scalar();
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  T v{};
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

std::optional<double> scalar_number(const Node& n) {
  if (!n.IsScalar()) return std::nullopt;
  std::string_view s = n.Scalar();
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  double v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  // from_chars reads "inf" and "nan"; no recipe value may be either.
  if (ec != std::errc() || end != s.data() + s.size() || s.empty() || !std::isfinite(v)) return std::nullopt;
  return v;
}

int64_t read_int(const Source& src, const Item& it, int64_t min, const std::string& what) {
  const auto v = scalar_integer<int64_t>(it.node);
  if (!v || *v < min) expected(src, it, what);
  return *v;
}

double read_number(const Source& src, const Item& it, bool (*ok)(double), const std::string& what) {
  const auto v = scalar_number(it.node);
  if (!v || !ok(*v)) expected(src, it, what);
  return *v;
}

bool read_bool(const Source& src, const Item& it, const char* what = "true or false") {
  // Only true/false: YAML 1.1's yes/no/on/off are too easy to write by accident.
  if (it.node.IsScalar() && it.node.Scalar() == "true") return true;
  if (it.node.IsScalar() && it.node.Scalar() == "false") return false;
  expected(src, it, what);
}

std::string read_string(const Source& src, const Item& it, const std::string& what = "a string") {
  if (!it.node.IsScalar()) expected(src, it, what);
  return it.node.Scalar();
}

std::string read_nonempty(const Source& src, const Item& it, const std::string& what) {
  std::string s = read_string(src, it, what);
  if (s.empty()) expected(src, it, what);
  return s;
}

std::string read_enum(const Source& src, const Item& it, const std::vector<std::string>& allowed) {
  std::string s = it.node.IsScalar() ? it.node.Scalar() : "";
  if (std::find(allowed.begin(), allowed.end(), s) == allowed.end())
    expected(src, it, "one of " + schema::joined(allowed));
  return s;
}

// A list of non-empty strings; a single string is a one-element list.
std::vector<std::string> read_string_list(const Source& src, const Item& it, const std::string& what) {
  if (it.node.IsScalar()) return {read_nonempty(src, it, what)};
  if (!it.node.IsSequence()) expected(src, it, what);
  std::vector<std::string> v;
  for (size_t i = 0; i < it.node.size(); ++i) {
    const Node e = it.node[i];
    const Item elem{str(it.path, "[", i, "]"), e, e.Mark()};
    if (!e.IsScalar() || e.Scalar().empty()) expected(src, elem, "a non-empty string");
    v.push_back(e.Scalar());
  }
  return v;
}

// ---- tree checks -----------------------------------------------------------

std::string key_text(const Node& key) {
  return key.IsScalar() ? key.Scalar() : "?";
}

// Duplicate keys: yaml-cpp keeps both and lookups see the first, so a later
// value would be silently ignored.
void check_duplicates(const Source& src, const Node& n, const std::string& path) {
  auto child_path = [&](const std::string& k) { return path.empty() ? k : path + "." + k; };
  if (n.IsMap()) {
    std::vector<std::pair<std::string, YAML::Mark>> seen;
    for (auto it = n.begin(); it != n.end(); ++it) {
      const std::string k = key_text(it->first);
      for (const auto& [name, mark] : seen)
        if (name == k && it->first.IsScalar())
          src.error(child_path(k), it->first.Mark(),
                    str("duplicate key '", child_path(k), "' (first given at line ", mark.line + 1,
                        ", again at line ", it->first.Mark().line + 1, ")"));
      seen.emplace_back(k, it->first.Mark());
      check_duplicates(src, it->second, child_path(k));
    }
  } else if (n.IsSequence()) {
    for (size_t i = 0; i < n.size(); ++i) check_duplicates(src, n[i], str(path, "[", i, "]"));
  }
}

std::string unknown_key_message(const std::string& section, const std::string& key) {
  if (section.empty())
    return str("unknown key '", key, "'", schema::did_you_mean("", key),
               " (known sections: ", schema::joined(schema::section_names()), ")");
  return str("unknown key '", section, ".", key, "'", schema::did_you_mean(section, key), " (known keys of ",
             section, ": ", schema::joined(schema::find_section(section)->keys), ")");
}

std::string section_expectation(const schema::Section& s) {
  return "a map of " + s.name + " keys (" + schema::joined(s.keys) + ")";
}

// Every key of every section is known; sections are maps (or empty).
void check_keys(const Source& src, const Node& root) {
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string name = key_text(it->first);
    const schema::Section* sec = schema::find_section(name);
    if (!sec) src.error(name, it->first.Mark(), unknown_key_message("", name));
    const Node body = it->second;
    if (body.IsNull()) continue;  // "quant:" with every key commented out
    if (!body.IsMap()) expected(src, Item{name, body, body.Mark()}, section_expectation(*sec));
    for (auto kv = body.begin(); kv != body.end(); ++kv) {
      const std::string key = key_text(kv->first);
      if (std::find(sec->keys.begin(), sec->keys.end(), key) == sec->keys.end())
        src.error(name + "." + key, kv->first.Mark(), unknown_key_message(name, key));
    }
  }
}

// ---- overrides -------------------------------------------------------------

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  std::string cur;
  for (char c : path) {
    if (c == '.') {
      parts.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  parts.push_back(cur);
  return parts;
}

// "key.path=value": the value is YAML, so lists and maps work
// ("lora.targets=[q_proj,v_proj]"). The path must name a section, a key of
// one, or a data.fields entry.
void apply_override(Source& src, Node& root, const std::string& text) {
  const std::string where = "override '" + text + "'";
  const size_t eq = text.find('=');
  if (eq == std::string::npos)
    fail(where, ": expected key.path=value, e.g. train.lr=1e-4 or lora.targets=[q_proj,v_proj]");
  // "train.lr = 1e-4" from a shell with spaces: the key path is the words before '='.
  std::string path = text.substr(0, eq);
  while (!path.empty() && path.back() == ' ') path.pop_back();
  while (!path.empty() && path.front() == ' ') path.erase(path.begin());
  const std::vector<std::string> parts = split_path(path);
  for (const auto& p : parts)
    if (p.empty()) fail(where, ": '", path, "' is not a key path like train.lr");
  const schema::Section* sec = schema::find_section(parts[0]);
  if (!sec) fail(where, ": ", unknown_key_message("", parts[0]));
  if (parts.size() >= 2 && std::find(sec->keys.begin(), sec->keys.end(), parts[1]) == sec->keys.end())
    fail(where, ": ", unknown_key_message(parts[0], parts[1]));
  if (parts.size() == 3 && !(parts[0] == "data" && parts[1] == "fields"))
    fail(where, ": ", parts[0], ".", parts[1], " has no sub-keys (only data.fields.NAME has)");
  if (parts.size() == 3) {
    const auto& fk = schema::field_keys();
    if (std::find(fk.begin(), fk.end(), parts[2]) == fk.end()) {
      const std::string near = schema::closest(parts[2], fk);
      fail(where, ": unknown key '", path, "'",
           near.empty() ? "" : "; did you mean 'data.fields." + near + "'?",
           " (known keys of data.fields: ", schema::joined(fk), ")");
    }
  }
  if (parts.size() > 3) fail(where, ": '", path, "' is not a key path like train.lr");

  Node value;
  if (comma_starting_a_document(text.substr(eq + 1)))
    fail(where, ": invalid YAML value: it cannot start with ','");
  try {
    value = YAML::Load(text.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    fail(where, ": invalid YAML value: ", e.msg);
  }
  src.overrides.emplace_back(path, text);
  check_duplicates(src, value, path);

  if (parts.size() == 1) {
    root[parts[0]] = value;
    return;
  }
  // A section given in the file as something else than a map is the file's
  // error, reported where it is.
  const Node section = root[parts[0]];
  if (section.IsDefined() && !section.IsNull() && !section.IsMap()) {
    Source file_only{src.name, {}};
    expected(file_only, Item{parts[0], section, section.Mark()}, section_expectation(*sec));
  }
  if (parts.size() == 2) {
    root[parts[0]][parts[1]] = value;
    return;
  }
  const Node fields = root[parts[0]][parts[1]];
  if (fields.IsDefined() && !fields.IsNull() && !fields.IsMap()) {
    Source file_only{src.name, {}};
    expected(file_only, Item{"data.fields", fields, fields.Mark()}, "a map of field names");
  }
  root[parts[0]][parts[1]][parts[2]] = value;
}

// ---- sections --------------------------------------------------------------

// The keys present in one section (after check_keys: all known).
class Section {
 public:
  Section(const Node& root, const std::string& name) : name_(name) {
    if (root.IsMap())
      for (auto it = root.begin(); it != root.end(); ++it)
        if (key_text(it->first) == name && it->second.IsMap()) body_ = it->second;
  }
  std::optional<Item> operator[](const std::string& key) const {
    if (!body_.IsMap()) return std::nullopt;
    for (auto it = body_.begin(); it != body_.end(); ++it)
      if (key_text(it->first) == key) {
        const YAML::Mark m = it->second.IsNull() ? it->first.Mark() : it->second.Mark();
        return Item{name_ + "." + key, it->second, m};
      }
    return std::nullopt;
  }

 private:
  std::string name_;
  Node body_;
};

bool positive(double v) {
  return v > 0;
}
bool non_negative(double v) {
  return v >= 0;
}
bool unit_open(double v) {
  return v >= 0 && v < 1;
}  // [0, 1)
bool unit_closed(double v) {
  return v >= 0 && v <= 1;
}  // [0, 1]

const std::vector<std::string> kModules{"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                        "gate_proj", "up_proj", "down_proj"};

void read_model(const Source& src, const Section& s, RecipeModel& m) {
  if (auto it = s["path"])
    m.path = read_nonempty(src, *it, "a model folder, 4-bit checkpoint or builtin:NAME");
  if (auto it = s["preset"]) m.preset = read_string(src, *it, "a preset name");
}

void read_quant(const Source& src, const Section& s, RecipeQuant& q) {
  if (auto it = s["type"]) q.type = read_enum(src, *it, {"nf4", "fp4", "none"});
  if (auto it = s["block_size"]) {
    const auto v = scalar_integer<int64_t>(it->node);
    if (!v || *v < 32 || *v > 4096 || (*v & (*v - 1)) != 0)
      expected(src, *it, "a power of two in [32, 4096] (32, 64, 128, ..., 4096)");
    q.block_size = *v;
  }
  if (auto it = s["double_quant"]) q.double_quant = read_bool(src, *it);
}

// Module names, or one of the words all-linear / attention; stored expanded,
// in the model's order (so the order written does not change the hash).
std::vector<std::string> read_targets(const Source& src, const Item& it) {
  const std::string what = "module names (" + schema::joined(kModules) + ") or all-linear or attention";
  const std::vector<std::string> names = read_string_list(src, it, what);
  if (names.empty()) expected(src, it, "at least one of " + what);
  for (const char* word : {"all-linear", "attention"})
    if (std::find(names.begin(), names.end(), word) != names.end()) {
      if (names.size() != 1) expected(src, it, std::string(word) + " alone, not mixed with other names");
      if (std::string(word) == "all-linear") return kModules;
      return {"q_proj", "k_proj", "v_proj", "o_proj"};
    }
  std::vector<std::string> out;
  for (size_t i = 0; i < names.size(); ++i) {
    const Node e = it.node.IsSequence() ? it.node[i] : it.node;
    const Item elem{it.node.IsSequence() ? str(it.path, "[", i, "]") : it.path, e, e.Mark()};
    if (std::find(kModules.begin(), kModules.end(), names[i]) == kModules.end())
      expected(src, elem, "one of " + schema::joined(kModules) + ", all-linear, attention");
    if (std::find(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(i), names[i]) !=
        names.begin() + static_cast<std::ptrdiff_t>(i))
      expected(src, elem, "each module once (" + names[i] + " is listed twice)");
  }
  for (const auto& m : kModules)
    if (std::find(names.begin(), names.end(), m) != names.end()) out.push_back(m);
  return out;
}

void read_lora(const Source& src, const Section& s, RecipeLora& l) {
  if (auto it = s["rank"]) l.rank = read_int(src, *it, 1, "an integer >= 1");
  if (auto it = s["alpha"]) l.alpha = read_number(src, *it, positive, "a number > 0");
  if (auto it = s["dropout"]) l.dropout = read_number(src, *it, unit_open, "a number in [0, 1)");
  if (auto it = s["rslora"]) l.rslora = read_bool(src, *it);
  if (auto it = s["targets"]) l.targets = read_targets(src, *it);
  if (auto it = s["init"]) l.init = read_nonempty(src, *it, "default or a PEFT adapter folder");
  // {pattern: value} maps; whether each pattern names a module of the model
  // is checked against the model's config (make_plan), as PEFT matches them.
  auto read_pattern = [&](const char* key, const std::string& what, auto read_value, auto& dst) {
    const auto it = s[key];
    if (!it) return;
    if (!it->node.IsMap()) expected(src, *it, "a map of module-name patterns to " + what + ", e.g. {down_proj: 8}");
    dst.clear();
    for (auto kv = it->node.begin(); kv != it->node.end(); ++kv) {
      const std::string k = key_text(kv->first);
      const Item value{it->path + "." + k, kv->second, kv->second.IsNull() ? kv->first.Mark() : kv->second.Mark()};
      if (k.empty()) expected(src, value, "a non-empty module-name pattern");
      for (const auto& [seen, v] : dst)
        if (seen == k) expected(src, value, "each pattern once ('" + k + "' is given twice)");
      dst.emplace_back(k, read_value(value));
    }
  };
  read_pattern("rank_pattern", "ranks", [&](const Item& v) { return read_int(src, v, 1, "a rank (an integer >= 1)"); },
               l.rank_pattern);
  read_pattern("alpha_pattern", "alphas",
               [&](const Item& v) { return read_number(src, v, positive, "an alpha (a number > 0)"); },
               l.alpha_pattern);
  if (auto it = s["dora"]) l.dora = read_bool(src, *it);
  if (auto it = s["plus_lr_ratio"])
    l.plus_lr_ratio = read_number(src, *it, positive, "a number > 0 (LoRA+: B's learning rate over A's; 1 = off)");
}

void read_data(const Source& src, const Section& s, RecipeData& d) {
  if (auto it = s["train"]) {
    d.train = read_string_list(src, *it, "a file or a list of files");
    if (d.train.empty()) expected(src, *it, "a file or a non-empty list of files");
  }
  if (auto it = s["val"]) {
    // A number is the share of train held out; anything else names files.
    if (const auto f = scalar_number(it->node)) {
      if (!unit_open(*f)) expected(src, *it, "a fraction in [0, 1) or a file or list of files");
      d.val_fraction = *f;
    } else {
      d.val = read_string_list(src, *it, "a fraction in [0, 1) or a file or list of files");
    }
  }
  if (auto it = s["format"]) {
    std::vector<std::string> formats;
    for (int f = 0; f <= static_cast<int>(DataFormat::tokens); ++f)
      formats.emplace_back(data_format_name(static_cast<DataFormat>(f)));
    d.format = read_enum(src, *it, formats);
  }
  if (auto it = s["fields"]) {
    if (!it->node.IsMap()) expected(src, *it, "a map of field names, e.g. {prompt: QUESTION}");
    const auto& known = schema::field_keys();
    d.fields.clear();
    for (auto kv = it->node.begin(); kv != it->node.end(); ++kv) {
      const std::string key = key_text(kv->first);
      const std::string path = it->path + "." + key;
      if (std::find(known.begin(), known.end(), key) == known.end()) {
        const std::string near = schema::closest(key, known);
        src.error(path, kv->first.Mark(),
                  str("unknown key '", path, "'",
                      near.empty() ? "" : "; did you mean '" + it->path + "." + near + "'?",
                      " (known keys of data.fields: ", schema::joined(known), ")"));
      }
      const Item value{path, kv->second, kv->second.IsNull() ? kv->first.Mark() : kv->second.Mark()};
      d.fields.emplace_back(key, read_nonempty(src, value, "a field name (a non-empty string)"));
    }
  }
  if (auto it = s["chat_template"]) {
    d.chat_template = read_nonempty(src, *it, "auto or a template name");
    if (d.chat_template != "auto") {
      try {
        (void)ChatTemplate::named(d.chat_template);
      } catch (const Error&) {
        expected(src, *it, "auto or one of " + schema::joined(ChatTemplate::names()));
      }
    }
  }
  if (auto it = s["seq_len"]) d.seq_len = read_int(src, *it, 2, "an integer >= 2");
  if (auto it = s["packing"]) d.packing = read_bool(src, *it);
  if (auto it = s["train_on_inputs"]) d.train_on_inputs = read_bool(src, *it);
  if (auto it = s["over_long"]) d.over_long = read_enum(src, *it, {"truncate", "drop"});
  if (auto it = s["on_bad_record"]) d.on_bad_record = read_enum(src, *it, {"error", "skip"});
  if (auto it = s["cache"]) d.cache = read_bool(src, *it);
  if (auto it = s["threads"]) d.threads = read_int(src, *it, 0, "an integer >= 0 (0 = all cores)");
}

void read_train(const Source& src, const Section& s, RecipeTrain& t) {
  if (auto it = s["epochs"]) t.epochs = read_int(src, *it, 1, "an integer >= 1");
  if (auto it = s["max_steps"]) t.max_steps = read_int(src, *it, 0, "an integer >= 0 (0 = use epochs)");
  if (auto it = s["micro_batch"]) t.micro_batch = read_int(src, *it, 1, "an integer >= 1");
  if (auto it = s["grad_accum"]) t.grad_accum = read_int(src, *it, 1, "an integer >= 1");
  if (auto it = s["lr"]) t.lr = read_number(src, *it, positive, "a number > 0");
  if (auto it = s["schedule"]) t.schedule = read_enum(src, *it, {"constant", "linear", "cosine"});
  if (auto it = s["warmup"]) {
    const std::string what = "a ratio in [0, 1) or a whole number of steps >= 1";
    t.warmup = read_number(src, *it, non_negative, what);
    if (t.warmup >= 1 && std::floor(t.warmup) != t.warmup) expected(src, *it, what);
  }
  if (auto it = s["min_lr_ratio"]) t.min_lr_ratio = read_number(src, *it, unit_closed, "a number in [0, 1]");
  if (auto it = s["optimizer"]) t.optimizer = read_enum(src, *it, {"adamw", "paged_adamw", "sgd"});
  if (auto it = s["weight_decay"]) t.weight_decay = read_number(src, *it, non_negative, "a number >= 0");
  if (auto it = s["beta1"]) t.beta1 = read_number(src, *it, unit_open, "a number in [0, 1)");
  if (auto it = s["beta2"]) t.beta2 = read_number(src, *it, unit_open, "a number in [0, 1)");
  if (auto it = s["eps"]) t.eps = read_number(src, *it, positive, "a number > 0");
  if (auto it = s["momentum"]) t.momentum = read_number(src, *it, unit_open, "a number in [0, 1)");
  if (auto it = s["max_grad_norm"])
    t.max_grad_norm = read_number(src, *it, non_negative, "a number >= 0 (0 = no clipping)");
  if (auto it = s["checkpointing"]) {
    if (it->node.IsScalar() && it->node.Scalar() == "auto")
      t.checkpointing_auto = true;
    else
      t.checkpointing = read_bool(src, *it, "true, false or auto");
  }
  if (auto it = s["seed"]) {
    const auto v = scalar_integer<uint64_t>(it->node);
    if (!v) expected(src, *it, "an integer in [0, 2^64)");
    t.seed = *v;
  }
  if (auto it = s["eval_every"])
    t.eval_every = read_int(src, *it, 0, "an integer >= 0 (0 = only at the end)");
  if (auto it = s["save_every"])
    t.save_every = read_int(src, *it, 0, "an integer >= 0 (0 = only at the end)");
  if (auto it = s["keep_checkpoints"]) t.keep_checkpoints = read_int(src, *it, 1, "an integer >= 1");
}

bool gpu_name_token(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
  });
}

void read_device(const Source& src, const Section& s, RecipeDevice& d) {
  if (auto it = s["backend"]) d.backend = read_enum(src, *it, {"auto", "cpu", "cuda"});
  if (auto it = s["memory_budget"]) {
    // The GPU name is only checked for shape here; the memory planner knows the names.
    const std::string what = "auto, a size such as 24GiB, 48GB or 80000MiB, or a GPU name such as rtx4090";
    const std::string v = read_nonempty(src, *it, what);
    const bool numeric = v[0] >= '0' && v[0] <= '9';
    if (numeric) {
      const auto bytes = parse_byte_size(v);
      if (!bytes || *bytes == 0) expected(src, *it, what);
    } else if (v != "auto" && !gpu_name_token(v)) {
      expected(src, *it, what);
    }
    d.memory_budget = v;
  }
  if (auto it = s["threads"]) d.threads = read_int(src, *it, 0, "an integer >= 0 (0 = all cores)");
}

void read_output(const Source& src, const Section& s, RecipeOutput& o) {
  if (auto it = s["dir"]) o.dir = read_nonempty(src, *it, "a folder");
  if (auto it = s["merge"]) o.merge = read_bool(src, *it);
  if (auto it = s["gguf"]) o.gguf = read_bool(src, *it);
}

void read_logging(const Source& src, const Section& s, RecipeLogging& l) {
  if (auto it = s["every"]) l.every = read_int(src, *it, 1, "an integer >= 1");
  if (auto it = s["report"]) l.report = read_bool(src, *it);
  if (auto it = s["sample_prompts"])
    l.sample_prompts = read_string_list(src, *it, "a prompt or a list of prompts");
  if (auto it = s["sample_max_new_tokens"])
    l.sample_max_new_tokens = read_int(src, *it, 1, "an integer >= 1");
}

// ---- settings that contradict each other -------------------------------------

// A value that has no effect under another setting is an error rather than a
// silent no-op: the user meant something by it. Only values that differ from
// the default are checked, so a recipe written back in full (recipe_to_yaml,
// every key present) always reads again. Reported at the value's position.
void check_combinations(const Source& src, const Node& root, const Recipe& r) {
  const auto at = [&](const char* section, const char* key, const std::string& why) {
    const auto it = Section(root, section)[key];
    src.error(it ? it->path : std::string(section) + "." + key, it ? it->mark : YAML::Mark::null_mark(), why);
  };
  const RecipeTrain& t = r.train;
  const RecipeTrain defaults;
  if (t.momentum != defaults.momentum && t.optimizer != "sgd")
    at("train", "momentum",
       str("train.momentum: ", t.momentum, " has no effect with train.optimizer ", t.optimizer,
           " (only sgd uses momentum); remove it or set train.optimizer: sgd"));
  if (t.warmup >= 1 && t.max_steps > 0 && t.warmup >= double(t.max_steps))
    at("train", "warmup",
       str("train.warmup: ", int64_t(t.warmup), " warmup steps take the whole run (train.max_steps is ", t.max_steps,
           "); expected fewer than ", t.max_steps, " steps, or a ratio in [0, 1)"));
  if (t.eval_every > 0 && r.data.val.empty() && r.data.val_fraction == 0.0)
    at("train", "eval_every",
       str("train.eval_every: ", t.eval_every,
           " asks for validation but there is no validation data; set data.val to a file or to the share of "
           "data.train to hold out (e.g. 0.05)"));
  const RecipeQuant q;
  if (r.quant.type == "none") {
    if (r.quant.block_size != q.block_size)
      at("quant", "block_size",
         str("quant.block_size: ", r.quant.block_size, " has no effect with quant.type none (a dense base)"));
    if (r.quant.double_quant != q.double_quant)
      at("quant", "double_quant", "quant.double_quant: has no effect with quant.type none (a dense base)");
  }
}

// ---- paths -----------------------------------------------------------------

std::string resolve(const std::string& p, const std::filesystem::path& base) {
  if (p.empty() || p.rfind("builtin:", 0) == 0 || base.empty()) return p;
  const std::filesystem::path path(p);
  if (path.is_absolute()) return p;
  return (base / path).lexically_normal().string();
}

void resolve_paths(Recipe& r, const std::filesystem::path& base) {
  r.model.path = resolve(r.model.path, base);
  for (auto& f : r.data.train) f = resolve(f, base);
  for (auto& f : r.data.val) f = resolve(f, base);
  if (r.lora.init != "default") r.lora.init = resolve(r.lora.init, base);
  r.output.dir = resolve(r.output.dir, base);
}

}  // namespace

Recipe parse_recipe(const std::string& yaml, const std::string& name, const std::filesystem::path& base_dir,
                    const std::vector<std::string>& overrides) {
  Source src{name, {}};
  // YAML is UTF-8; yaml-cpp reads other bytes but writes them back changed,
  // so the recipe.yaml stored in the run folder would name another file
  // (found by fuzz/fuzz_recipe).
  size_t bad = 0;
  if (!valid_utf8(yaml, &bad))
    fail(name, ":", std::count(yaml.begin(), yaml.begin() + std::ptrdiff_t(bad), '\n') + 1,
         ": invalid UTF-8 (a recipe is UTF-8 text)");
  for (const auto& o : overrides)
    if (!valid_utf8(o)) fail("override ", o, ": invalid UTF-8");
  if (const size_t line = comma_starting_a_document(yaml))
    fail(name, ":", line, ": invalid YAML: a document cannot start with ','");
  Node root;
  try {
    const size_t docs = count_documents(yaml, name);
    if (docs > 1) fail(name, ": holds ", docs, " YAML documents (separated by ---); a recipe is one");
    if (docs == 1) root = YAML::Load(yaml);
  } catch (const YAML::ParserException& e) {
    if (e.mark.is_null()) fail(name, ": invalid YAML: ", e.msg);
    fail(name, ":", e.mark.line + 1, ":", e.mark.column + 1, ": invalid YAML: ", e.msg);
  } catch (const YAML::Exception& e) {
    fail(name, ": invalid YAML: ", e.msg);
  }
  const std::string sections = schema::joined(schema::section_names());
  if (root.IsNull())
    fail(name, ": the recipe is empty; expected a map of sections (", sections,
         ") with at least model.path, data.train and output.dir");
  if (!root.IsMap())
    expected(src, Item{"the recipe", root, root.Mark()}, "a map of sections (" + sections + ")");
  check_duplicates(src, root, "");
  for (const auto& o : overrides) apply_override(src, root, o);
  check_keys(src, root);

  // Required keys before values: "missing model.path" is the likelier first problem.
  for (const char* required : {"model.path", "data.train", "output.dir"}) {
    const auto parts = split_path(required);
    if (!Section(root, parts[0])[parts[1]])
      fail(name, ": missing required key '", required, "' (set it in the recipe or override it with ",
           required, "=...)");
  }

  Recipe r;
  read_model(src, Section(root, "model"), r.model);
  read_quant(src, Section(root, "quant"), r.quant);
  read_lora(src, Section(root, "lora"), r.lora);
  read_data(src, Section(root, "data"), r.data);
  read_train(src, Section(root, "train"), r.train);
  read_device(src, Section(root, "device"), r.device);
  read_output(src, Section(root, "output"), r.output);
  read_logging(src, Section(root, "logging"), r.logging);
  check_combinations(src, root, r);
  resolve_paths(r, base_dir);
  return r;
}

Recipe load_recipe(const std::filesystem::path& file, const std::vector<std::string>& overrides) {
  if (std::filesystem::is_directory(file)) fail(file.string(), ": is a folder; expected a recipe file (YAML)");
  std::ifstream in(file, std::ios::binary);
  if (!in)
    fail(file.string(), ": cannot read the recipe (",
         std::filesystem::exists(file) ? "unreadable" : "no such file", ")");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) fail(file.string(), ": cannot read the recipe");
  Recipe r =
      parse_recipe(text.str(), file.string(), std::filesystem::absolute(file).parent_path(), overrides);
  r.file = file;
  return r;
}

}  // namespace qlora
