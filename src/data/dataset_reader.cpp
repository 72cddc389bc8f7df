#include "data/dataset_reader.h"

#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "core/error.h"
#include "core/json_parse.h"
#include "core/mapped_file.h"

namespace qlora {

using nlohmann::json;

namespace {

constexpr const char* kFormatNames[] = {"alpaca", "messages", "sharegpt", "prompt_completion", "text", "tokens"};
constexpr size_t kMaxSkipReasons = 20;

const char* type_name(const json& j) {
  switch (j.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float: return "a number";
    default: return "not a JSON value";
  }
}

// A required string field. allow_empty is for optional parts such as alpaca's
// input; every text the model reads or learns must otherwise be non-empty.
std::string get_string(const json& obj, const std::string& field, bool required, bool allow_empty,
                       const std::string& ctx = "") {
  const auto it = obj.find(field);
  if (it == obj.end() || (!required && it->is_null())) {
    if (required) fail(ctx, "missing field \"", field, "\"");
    return {};
  }
  if (!it->is_string()) fail(ctx, "field \"", field, "\" is ", type_name(*it), ", expected a string");
  std::string s = it->get<std::string>();
  if (s.empty() && !allow_empty) fail(ctx, "field \"", field, "\" is empty");
  return s;
}

const json& get_array(const json& obj, const std::string& field, const std::string& ctx = "") {
  const auto it = obj.find(field);
  if (it == obj.end()) fail(ctx, "missing field \"", field, "\"");
  if (!it->is_array()) fail(ctx, "field \"", field, "\" is ", type_name(*it), ", expected an array");
  if (it->empty()) fail(ctx, "field \"", field, "\" is an empty array");
  return *it;
}

void require_object(const json& j, const std::string& what) {
  if (!j.is_object()) fail(what, " is ", type_name(j), ", expected an object");
}

// Checks what every template needs: something to train on.
void require_assistant(const Conversation& c) {
  for (const auto& m : c)
    if (m.role == Role::assistant) return;
  fail("conversation has no assistant message (nothing to train on)");
}

// Adds a message; empty system messages (common in exported data) are dropped,
// any other empty text is an error.
void add_message(Conversation& c, Role r, std::string content, const std::string& ctx) {
  if (content.empty()) {
    if (r == Role::system) return;
    fail(ctx, role_name(r), " message is empty");
  }
  c.push_back(Message{r, std::move(content), {}});
}

Conversation alpaca(const json& rec, const FieldNames& f) {
  // A record is one turn, or an array of turns (multi-turn, lawyer-llama style).
  const bool multi = rec.is_array();
  if (multi && rec.empty()) fail("record is an empty array");
  Conversation c;
  const size_t n = multi ? rec.size() : 1;
  for (size_t i = 0; i < n; ++i) {
    const json& turn = multi ? rec[i] : rec;
    const std::string ctx = multi ? str("turn ", i, ": ") : "";
    require_object(turn, multi ? str("turn ", i) : "record");
    if (i == 0) add_message(c, Role::system, get_string(turn, f.system, false, true, ctx), ctx);
    Message user{Role::user, get_string(turn, f.instruction, true, false, ctx),
                 get_string(turn, f.input, false, true, ctx)};
    c.push_back(std::move(user));
    c.push_back(Message{Role::assistant, get_string(turn, f.output, true, false, ctx), {}});
  }
  return c;
}

// OpenAI content: a string, or parts [{"type": "text", "text": ...}] (LLaMA-Factory
// writes "value" instead of "text"); text parts are concatenated.
std::string message_content(const json& m, const FieldNames& f, const std::string& ctx) {
  const auto it = m.find(f.content);
  if (it == m.end()) fail(ctx, "missing field \"", f.content, "\"");
  if (it->is_string()) return it->get<std::string>();
  if (!it->is_array()) fail(ctx, "field \"", f.content, "\" is ", type_name(*it), ", expected a string or parts");
  std::string s;
  for (size_t k = 0; k < it->size(); ++k) {
    const json& part = (*it)[k];
    const std::string pctx = str(ctx, f.content, "[", k, "]: ");
    require_object(part, str(ctx, f.content, "[", k, "]"));
    const std::string type = get_string(part, "type", true, false, pctx);
    if (type != "text") fail(pctx, "part of type \"", type, "\" (only text parts are supported)");
    s += get_string(part, part.contains("text") ? "text" : "value", true, true, pctx);
  }
  return s;
}

Conversation messages(const json& rec, const FieldNames& f) {
  const json& arr = get_array(rec, f.messages);
  Conversation c;
  for (size_t i = 0; i < arr.size(); ++i) {
    const std::string ctx = str(f.messages, "[", i, "]: ");
    require_object(arr[i], str(f.messages, "[", i, "]"));
    const std::string role = get_string(arr[i], f.role, true, false, ctx);
    Role r;
    if (role == "system") r = Role::system;
    else if (role == "user") r = Role::user;
    else if (role == "assistant") r = Role::assistant;
    else fail(ctx, "unknown role \"", role, "\" (expected system, user or assistant)");
    add_message(c, r, message_content(arr[i], f, ctx), ctx);
  }
  return c;
}

Conversation sharegpt(const json& rec, const FieldNames& f) {
  const json& arr = get_array(rec, f.conversations);
  Conversation c;
  for (size_t i = 0; i < arr.size(); ++i) {
    const std::string ctx = str(f.conversations, "[", i, "]: ");
    require_object(arr[i], str(f.conversations, "[", i, "]"));
    const std::string from = get_string(arr[i], f.from, true, false, ctx);
    Role r;
    if (from == "system") r = Role::system;
    else if (from == "human" || from == "user") r = Role::user;
    else if (from == "gpt" || from == "assistant") r = Role::assistant;
    else fail(ctx, "unknown \"", f.from, "\" value \"", from, "\" (expected system, human or gpt)");
    add_message(c, r, get_string(arr[i], f.value, true, true, ctx), ctx);
  }
  return c;
}

std::vector<int32_t> int_array(const json& arr, const std::string& field, int64_t min) {
  std::vector<int32_t> v;
  v.reserve(arr.size());
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& x = arr[i];
    if (!x.is_number_integer()) fail(field, "[", i, "] is ", type_name(x), ", expected an integer");
    const bool too_big = x.is_number_unsigned() ? x.get<uint64_t>() > uint64_t(std::numeric_limits<int32_t>::max())
                                                : x.get<int64_t>() > std::numeric_limits<int32_t>::max();
    const int64_t val = too_big ? 0 : x.get<int64_t>();
    if (too_big || val < min)
      fail(field, "[", i, "] = ", x.dump(), " is out of range (", min == 0 ? "token ids are >= 0" : "labels are -100 or ids",
           ")");
    v.push_back(static_cast<int32_t>(val));
  }
  return v;
}

Sample tokens(const json& rec, const FieldNames& f) {
  Sample s;
  s.kind = Sample::Kind::tokens;
  s.input_ids = int_array(get_array(rec, f.input_ids), f.input_ids, 0);
  const auto it = rec.find(f.labels);
  if (it != rec.end() && !it->is_null()) {
    if (!it->is_array()) fail("field \"", f.labels, "\" is ", type_name(*it), ", expected an array");
    s.labels = int_array(*it, f.labels, -100);
    for (size_t i = 0; i < s.labels.size(); ++i)
      if (s.labels[i] < 0 && s.labels[i] != -100) fail(f.labels, "[", i, "] = ", s.labels[i], " (labels are -100 or ids)");
    if (s.labels.size() != s.input_ids.size())
      fail("field \"", f.labels, "\" has ", s.labels.size(), " entries but \"", f.input_ids, "\" has ",
           s.input_ids.size());
  }
  return s;
}

// The field whose presence makes a top-level JSON object one record rather
// than an object of records.
const std::string& key_field(const ReadOptions& o) {
  const FieldNames& f = o.fields;
  switch (o.format) {
    case DataFormat::alpaca: return f.instruction;
    case DataFormat::messages: return f.messages;
    case DataFormat::sharegpt: return f.conversations;
    case DataFormat::prompt_completion: return f.prompt;
    case DataFormat::text: return f.text;
    case DataFormat::tokens: return f.input_ids;
  }
  return f.text;
}

size_t line_of_offset(std::string_view bytes, size_t offset) {
  size_t line = 1;
  for (size_t i = 0; i < offset && i < bytes.size(); ++i) line += bytes[i] == '\n';
  return line;
}

// Collects samples or bad-record reports according to on_bad_record.
class Collector {
 public:
  Collector(const ReadOptions& o, ReadResult& r) : opts_(o), result_(r) {}
  template <typename F>
  void record(const std::string& where, F&& make) {
    std::string problem;
    try {
      Sample s = make();
      s.where = where;
      result_.samples.push_back(std::move(s));
      return;
    } catch (const Error& e) {
      problem = e.what();
    } catch (const json::exception& e) {
      problem = str("malformed JSON: ", e.what());
    }
    if (opts_.on_bad_record == OnBadRecord::error) fail(where, ": ", problem);
    ++result_.skipped;
    if (result_.skip_reasons.size() < kMaxSkipReasons) result_.skip_reasons.push_back(where + ": " + problem);
  }

 private:
  const ReadOptions& opts_;
  ReadResult& result_;
};

// The longest JSONL record read: a line longer than this (a file that is not
// JSONL, a runaway export) is a bad record, not gigabytes of parser memory.
constexpr size_t kMaxRecordBytes = size_t(64) << 20;

void read_jsonl(std::string_view bytes, const std::string& name, const ReadOptions& o, ReadResult& r) {
  Collector col(o, r);
  size_t pos = 0, line = 0;
  while (pos < bytes.size()) {
    size_t end = bytes.find('\n', pos);
    if (end == std::string::npos) end = bytes.size();
    std::string_view text(bytes.data() + pos, end - pos);
    pos = end + 1;
    ++line;
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
    if (text.find_first_not_of(" \t") == std::string_view::npos) continue;  // blank lines are not records
    col.record(str(name, ":", line), [&] {
      if (text.size() > kMaxRecordBytes)
        fail("the line is ", text.size(), " bytes; a record may have at most ", kMaxRecordBytes >> 20, " MiB");
      size_t bad = 0;
      if (!valid_utf8(text, &bad)) fail("invalid UTF-8 at byte ", bad + 1, " of the line");
      json j;
      try {
        j = parse_json(text, "");           // the record's file:line prefixes the error
      } catch (const json::exception& e) {  // parse_error, or out_of_range for "1e999"
        fail("malformed JSON: ", e.what());
      }
      return record_to_sample(j, o);
    });
  }
}

}  // namespace

DataFormat parse_data_format(std::string_view name) {
  for (size_t i = 0; i < std::size(kFormatNames); ++i)
    if (name == kFormatNames[i]) return static_cast<DataFormat>(i);
  std::string all;
  for (const char* n : kFormatNames) all += (all.empty() ? "" : ", ") + std::string(n);
  fail("unknown data format '", name, "'; supported: ", all);
}

const char* data_format_name(DataFormat f) { return kFormatNames[static_cast<size_t>(f)]; }

OnBadRecord parse_on_bad_record(std::string_view name) {
  if (name == "error") return OnBadRecord::error;
  if (name == "skip") return OnBadRecord::skip;
  fail("on_bad_record: '", name, "' is neither error nor skip");
}

bool valid_utf8(std::string_view s, size_t* bad_offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned c = p[i];
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07;
    } else {
      if (bad_offset) *bad_offset = i;
      return false;
    }
    bool ok = i + len <= n;
    for (size_t k = 1; ok && k < len; ++k) {
      ok = (p[i + k] & 0xC0) == 0x80;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    // Overlong forms, UTF-16 surrogates and code points past U+10FFFF are invalid.
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (!ok || cp < kMin[len] || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) {
      if (bad_offset) *bad_offset = i;
      return false;
    }
    i += len;
  }
  return true;
}

Sample record_to_sample(const json& rec, const ReadOptions& o) {
  const FieldNames& f = o.fields;
  if (!(o.format == DataFormat::alpaca && rec.is_array())) require_object(rec, "record");
  Sample s;
  switch (o.format) {
    case DataFormat::alpaca: s.conversation = alpaca(rec, f); break;
    case DataFormat::messages: s.conversation = messages(rec, f); break;
    case DataFormat::sharegpt: s.conversation = sharegpt(rec, f); break;
    case DataFormat::prompt_completion:
      s.conversation = {Message{Role::user, get_string(rec, f.prompt, true, false), {}},
                        Message{Role::assistant, get_string(rec, f.completion, true, false), {}}};
      break;
    case DataFormat::text:
      s.kind = Sample::Kind::text;
      s.text = get_string(rec, f.text, true, false);
      return s;
    case DataFormat::tokens: return tokens(rec, f);
  }
  require_assistant(s.conversation);
  return s;
}

ReadResult read_dataset(const std::filesystem::path& file, const ReadOptions& o) {
  const std::string name = file.string();
  if (!std::ifstream(file, std::ios::binary)) fail("dataset ", name, ": cannot open");
  // Mapped, not copied: a large file costs page cache, not a second copy.
  const MappedFile map(file);
  const std::string_view bytes(reinterpret_cast<const char*>(map.bytes().data()), map.size());

  ReadResult r;
  const std::string ext = file.extension().string();
  const size_t first = bytes.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) fail("dataset ", name, ": file is empty");
  if (ext == ".jsonl" || ext == ".ndjson" || (bytes[first] != '[' && bytes[first] != '{')) {
    read_jsonl(bytes, name, o, r);
    if (r.samples.empty() && r.skipped == 0) fail("dataset ", name, ": no records");
    return r;
  }
  // One JSON document, parsed whole (its tree takes several times the file's
  // size): past 1 GiB that is refused in favour of JSONL, read line by line.
  constexpr size_t kMaxDocumentBytes = size_t(1) << 30;
  if (bytes.size() > kMaxDocumentBytes)
    fail("dataset ", name, ": a JSON document of ", bytes.size() >> 20,
         " MiB; files over 1 GiB must be JSONL (one record a line, named *.jsonl)");
  // Invalid UTF-8 makes the whole document unreadable, so
  // it is reported, with its line, before parsing.
  size_t bad = 0;
  if (!valid_utf8(bytes, &bad)) fail(name, ":", line_of_offset(bytes, bad), ": invalid UTF-8");
  json doc;
  try {
    doc = parse_json(bytes, name);
  } catch (const json::parse_error& e) {
    // "{...}\n{...}" is JSONL in a .json file: read it line by line.
    if (bytes[first] == '{') {
      read_jsonl(bytes, name, o, r);
      return r;
    }
    fail(name, ":", line_of_offset(bytes, e.byte == 0 ? 0 : e.byte - 1), ": malformed JSON: ", e.what());
  } catch (const json::exception& e) {
    // A number too large for a double ("1e999") is out_of_range, not a
    // parse_error (found by fuzz/fuzz_dataset).
    fail(name, ": malformed JSON: ", e.what());
  }
  Collector col(o, r);
  if (doc.is_array()) {
    for (size_t i = 0; i < doc.size(); ++i) col.record(str(name, "[", i, "]"), [&] { return record_to_sample(doc[i], o); });
  } else if (doc.contains(key_field(o))) {
    col.record(name, [&] { return record_to_sample(doc, o); });
  } else {
    // Not a structured binding: clang 14 cannot capture one in a lambda.
    for (const auto& item : doc.items())
      col.record(str(name, "[", item.key(), "]"), [&] { return record_to_sample(item.value(), o); });
  }
  if (r.samples.empty() && r.skipped == 0) fail("dataset ", name, ": no records");
  return r;
}

}  // namespace qlora
