#include "io/safetensors.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <set>
#include <system_error>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/json_parse.h"

namespace qlora {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// The reference implementation (huggingface/safetensors) refuses larger
// headers; a bigger length field is far more likely corruption than a model.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

std::optional<uint64_t> checked_mul(uint64_t a, uint64_t b) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// A JSON value as a non-negative integer; nlohmann stores "5" as unsigned,
// "-5" as signed and "5.0" or "1e3" as float, and only the first is valid here.
std::optional<uint64_t> as_uint(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return uint64_t(v.get<int64_t>());
  return std::nullopt;
}

}  // namespace

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    if (d < 0) fail("shape ", shape_str(s), " has a negative dimension");
    if (__builtin_mul_overflow(n, d, &n)) fail("shape ", shape_str(s), ": element count overflows 64 bits");
  }
  return n;
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) r += ", ";
    r += std::to_string(s[i]);
  }
  return r + "]";
}

// ---------------------------------------------------------------- reader ----

SafetensorsFile::SafetensorsFile(const fs::path& file) : map_(file) {
  const std::string p = map_.path().string();
  const auto bytes = map_.bytes();
  const uint64_t size = bytes.size();
  if (size < 8) fail(p, ": file is ", size, " bytes, too short for the 8-byte header length");
  const uint64_t n = read_le64(bytes.data());
  if (n == 0) fail(p, ": header length is 0, expected a JSON object");
  if (n > kMaxHeaderBytes)
    fail(p, ": header length ", n, " exceeds the limit of ", kMaxHeaderBytes, " bytes (file size ", size, ")");
  if (n > size - 8) fail(p, ": header length ", n, " exceeds file size ", size, " (at most ", size - 8, " possible)");
  data_start_ = 8 + n;
  const uint64_t data_size = size - data_start_;

  // A JSON object may repeat a key and nlohmann keeps only the last one; a
  // repeated tensor name would silently lose a tensor, so catch it here.
  std::optional<std::string> duplicate;
  std::set<std::string, std::less<>> seen;
  auto on_event = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (depth == 1 && ev == json::parse_event_t::key && !duplicate) {
      const auto& k = parsed.get_ref<const std::string&>();
      if (!seen.insert(k).second) duplicate = k;
    }
    return true;
  };
  json header;
  try {
    const char* h = reinterpret_cast<const char*>(bytes.data() + 8);
    check_json_shape(std::string_view(h, size_t(n)), p);
    header = json::parse(h, h + n, on_event);
  } catch (const json::exception& e) {
    fail(p, ": header is not valid JSON: ", e.what());
  }
  if (!header.is_object()) fail(p, ": header is not a JSON object (got ", header.type_name(), ")");
  if (duplicate) fail(p, ": header names '", *duplicate, "' more than once");

  for (const auto& item : header.items()) {
    const std::string& name = item.key();
    const json& v = item.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(p, ": __metadata__ must be an object of strings, got ", v.type_name());
      for (const auto& [k, mv] : v.items()) {
        if (!mv.is_string())
          fail(p, ": __metadata__ key '", k, "' must be a string, got ", mv.type_name());
        metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    auto bad = [&](auto&&... what) { fail(p, ": tensor '", name, "': ", what...); };
    if (!v.is_object()) bad("entry must be an object with dtype, shape and data_offsets, got ", v.type_name());
    for (const char* key : {"dtype", "shape", "data_offsets"})
      if (!v.contains(key)) bad("missing \"", key, "\"");

    TensorInfo t;
    t.name = name;
    const json& dt = v.at("dtype");
    if (!dt.is_string()) bad("dtype must be a string, got ", dt.type_name());
    const auto dtype = dtype_from_name(dt.get_ref<const std::string&>());
    if (!dtype) bad("unknown dtype '", dt.get_ref<const std::string&>(), "', expected one of ", dtype_all_names());
    t.dtype = *dtype;

    const json& sh = v.at("shape");
    if (!sh.is_array()) bad("shape must be an array of non-negative integers, got ", sh.type_name());
    uint64_t numel = 1;
    for (const json& d : sh) {
      // Described rather than dumped: dump() recurses, and a hostile header
      // can nest arrays deeply enough to exhaust the stack.
      const auto dim = as_uint(d);
      if (!dim || *dim > uint64_t(std::numeric_limits<int64_t>::max()))
        bad("shape must be an array of non-negative integers, but entry ", t.shape.size(), " is ",
            d.is_number() ? "negative, fractional or too large" : d.type_name());
      t.shape.push_back(int64_t(*dim));
      const auto m = checked_mul(numel, *dim);
      if (!m) bad("shape ", shape_str(t.shape), " has more elements than fit in 64 bits");
      numel = *m;
    }
    // Checked even though the byte count is compared below, because
    // shape_numel() must not overflow for anything a caller gets from us.
    if (numel > uint64_t(std::numeric_limits<int64_t>::max())) bad("shape ", shape_str(t.shape), " is too large");

    const json& off = v.at("data_offsets");
    if (!off.is_array() || off.size() != 2)
      bad("data_offsets must be an array [begin, end], got ",
          off.is_array() ? str("an array of ", off.size(), " entries") : std::string(off.type_name()));
    if (!as_uint(off[0]) || !as_uint(off[1])) bad("data_offsets must hold two non-negative integers");
    t.begin = *as_uint(off[0]);
    t.end = *as_uint(off[1]);
    if (t.begin > t.end) bad("data_offsets [", t.begin, ", ", t.end, "]: begin is after end");

    const auto nbytes = checked_mul(numel, dtype_size(t.dtype));
    if (!nbytes) bad("shape ", shape_str(t.shape), " x ", dtype_name(t.dtype), " overflows 64 bits");
    if (*nbytes != t.nbytes())
      bad("shape ", shape_str(t.shape), " of ", dtype_name(t.dtype), " needs ", *nbytes,
          " bytes but data_offsets [", t.begin, ", ", t.end, "] hold ", t.nbytes());
    tensors_.push_back(std::move(t));
  }

  // Like the reference implementation: the ranges, sorted, must tile the data
  // section exactly (no overlap, no hole, nothing after the last tensor).
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t expected = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : tensors_) {
    if (t.begin < expected)
      fail(p, ": tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end, "] overlap tensor '", prev->name,
           "' [", prev->begin, ", ", prev->end, "]");
    if (t.begin > expected)
      fail(p, ": hole in the data section: tensor '", t.name, "' begins at ", t.begin, ", expected ", expected,
           prev ? str(" (the end of tensor '", prev->name, "')") : std::string(" (the start of the data section)"));
    if (t.end > data_size)
      fail(p, ": tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end, "] extend past the end of the file (data section is ",
           data_size, " bytes)");
    expected = t.end;
    prev = &t;
  }
  if (expected != data_size)
    fail(p, ": ", data_size - expected, " trailing bytes after the last tensor (tensors end at ", expected,
         ", the data section is ", data_size, " bytes)");

  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::span<const uint8_t> SafetensorsFile::data(const TensorInfo& t) const {
  // Guards against a TensorInfo that came from another file.
  const uint64_t data_size = map_.size() - data_start_;
  if (t.begin > t.end || t.end > data_size)
    fail(path().string(), ": tensor '", t.name, "' range [", t.begin, ", ", t.end, "] is outside the data section (",
         data_size, " bytes)");
  return map_.bytes().subspan(data_start_ + t.begin, t.nbytes());
}

// ----------------------------------------------------------------- model ----

namespace {

json read_json_file(const fs::path& path) {
  MappedFile m(path);
  const char* b = reinterpret_cast<const char*>(m.bytes().data());
  try {
    return parse_json(std::string_view(b, m.size()), path.string());
  } catch (const json::exception& e) {
    fail(path.string(), ": not valid JSON: ", e.what());
  }
}

}  // namespace

SafetensorsModel::SafetensorsModel(const fs::path& dir_or_file) : source_(dir_or_file) {
  std::error_code ec;
  const auto st = fs::status(source_, ec);
  if (!fs::exists(st)) fail(source_.string(), ": no such file or folder");

  fs::path index_path;
  if (fs::is_directory(st)) {
    if (fs::exists(source_ / "model.safetensors.index.json", ec)) {
      index_path = source_ / "model.safetensors.index.json";
    } else if (fs::exists(source_ / "model.safetensors", ec)) {
      files_.push_back(std::make_unique<SafetensorsFile>(source_ / "model.safetensors"));
    } else {
      fail("no model.safetensors or model.safetensors.index.json in ", source_.string());
    }
  } else if (source_.extension() == ".json") {
    index_path = source_;
  } else {
    files_.push_back(std::make_unique<SafetensorsFile>(source_));
  }

  if (index_path.empty()) {
    for (const TensorInfo& t : files_[0]->tensors()) entries_.emplace(t.name, Entry{files_[0].get(), &t});
  } else {
    const std::string ip = index_path.string();
    const json index = read_json_file(index_path);
    if (!index.is_object() || !index.contains("weight_map") || !index.at("weight_map").is_object())
      fail(ip, ": expected an object with a \"weight_map\" object");
    std::map<std::string, std::string> weight_map;  // tensor -> shard file name
    std::map<std::string, const SafetensorsFile*> shards;
    for (const auto& [name, v] : index.at("weight_map").items()) {
      if (!v.is_string()) fail(ip, ": weight_map entry '", name, "' must be a file name string, got ", v.type_name());
      // Shards live beside the index: a path would let an index reach any file.
      const std::string shard = v.get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
        fail(ip, ": weight_map entry '", name, "' names \"", shard, "\", expected a file name in the same folder");
      weight_map[name] = shard;
      shards[v.get<std::string>()] = nullptr;
    }
    const fs::path dir = index_path.parent_path();
    for (auto& [shard, file] : shards) {
      const fs::path sp = dir / shard;
      if (!fs::is_regular_file(sp, ec)) fail(ip, ": shard ", sp.string(), " listed in the weight_map does not exist");
      files_.push_back(std::make_unique<SafetensorsFile>(sp));
      file = files_.back().get();
    }
    for (const auto& [name, shard] : weight_map) {
      const SafetensorsFile* f = shards.at(shard);
      const TensorInfo* t = f->find(name);
      if (!t)
        fail(ip, ": tensor '", name, "' is listed in the weight_map for shard ", shard, " but ",
             f->path().string(), " does not contain it");
      entries_.emplace(name, Entry{f, t});
    }
    // Every shard tensor must be indexed, and only in its own shard; anything
    // else means the index and the shards disagree about the model.
    for (const auto& [shard, f] : shards) {
      for (const TensorInfo& t : f->tensors()) {
        const auto it = weight_map.find(t.name);
        if (it == weight_map.end())
          fail(ip, ": shard ", f->path().string(), " holds tensor '", t.name, "' that the weight_map does not list");
        if (it->second != shard)
          fail(ip, ": tensor '", t.name, "' is in two shards: ", it->second, " (per the weight_map) and ", shard);
      }
    }
  }
  names_.reserve(entries_.size());
  for (const auto& kv : entries_) names_.push_back(kv.first);
}

const SafetensorsModel::Entry* SafetensorsModel::find(std::string_view name) const {
  const auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

const SafetensorsModel::Entry& SafetensorsModel::at(std::string_view name) const {
  const Entry* e = find(name);
  if (!e) fail(source_.string(), ": no tensor named '", name, "'");
  return *e;
}

std::span<const uint8_t> SafetensorsModel::data(std::string_view name) const {
  const Entry& e = at(name);
  return e.file->data(*e.info);
}

uint64_t SafetensorsModel::total_bytes() const {
  uint64_t n = 0;
  for (const auto& kv : entries_) n += kv.second.info->nbytes();
  return n;
}

// ---------------------------------------------------------------- writer ----

std::string safetensors_header_json(const std::vector<TensorSpec>& specs,
                                    const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps the tensors in spec order, which is also data order.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  std::set<std::string_view> names;
  uint64_t offset = 0;
  for (const TensorSpec& s : specs) {
    if (s.name == "__metadata__") fail("'__metadata__' is reserved and cannot name a tensor");
    if (!names.insert(s.name).second) fail("tensor '", s.name, "' is declared twice");
    uint64_t nbytes = 0;
    try {
      const auto m = checked_mul(uint64_t(shape_numel(s.shape)), dtype_size(s.dtype));
      if (!m) fail("its byte size overflows 64 bits");
      nbytes = *m;
    } catch (const Error& e) {
      fail("tensor '", s.name, "' shape ", shape_str(s.shape), ": ", e.what());
    }
    if (__builtin_add_overflow(offset, nbytes, &offset)) fail("total tensor size overflows 64 bits");
    header[s.name] = {{"dtype", dtype_name(s.dtype)}, {"shape", s.shape}, {"data_offsets", {offset - nbytes, offset}}};
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  try {
    return header.dump();
  } catch (const nlohmann::ordered_json::exception& e) {  // e.g. a name that is not UTF-8
    fail("cannot write the safetensors header: ", e.what());
  }
}

SafetensorsWriter::SafetensorsWriter(const fs::path& dest, std::vector<TensorSpec> specs,
                                     const std::map<std::string, std::string>& metadata)
    : specs_(std::move(specs)) {
  std::string text;
  try {
    text = safetensors_header_json(specs_, metadata);
  } catch (const Error& e) {
    fail(dest.string(), ": ", e.what());
  }
  // The reference writer pads with spaces so the data section starts 8-byte
  // aligned, letting readers view mapped tensors in place.
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');

  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
  file_ = std::make_unique<AtomicFile>(dest);
  file_->write(len, 8);
  file_->write(text);
}

SafetensorsWriter::~SafetensorsWriter() = default;

void SafetensorsWriter::write(std::span<const uint8_t> bytes) {
  if (!file_) fail("safetensors writer: write after commit or after an earlier error");
  // Any failure drops the temporary file: a half-written tensor file must not
  // be committable.
  try {
    while (!bytes.empty()) {
      while (current_ < specs_.size() && written_in_current_ == specs_[current_].nbytes()) {
        ++current_;
        written_in_current_ = 0;
      }
      if (current_ == specs_.size())
        fail(file_->dest().string(), ": ", bytes.size(), " bytes more than the declared tensors hold");
      const uint64_t take = std::min<uint64_t>(bytes.size(), specs_[current_].nbytes() - written_in_current_);
      file_->write(bytes.data(), size_t(take));
      written_in_current_ += take;
      bytes = bytes.subspan(size_t(take));
    }
  } catch (...) {
    file_.reset();
    throw;
  }
}

void SafetensorsWriter::commit() {
  if (!file_) fail("safetensors writer: commit after commit or after an earlier error");
  while (current_ < specs_.size() && written_in_current_ == specs_[current_].nbytes()) {
    ++current_;
    written_in_current_ = 0;
  }
  if (current_ != specs_.size()) {
    uint64_t declared = 0, written = written_in_current_;
    for (size_t i = 0; i < specs_.size(); ++i) {
      declared += specs_[i].nbytes();
      if (i < current_) written += specs_[i].nbytes();
    }
    const std::string d = file_->dest().string();
    file_.reset();
    fail(d, ": only ", written, " of ", declared, " declared tensor bytes were written (tensor '",
         specs_[current_].name, "' is incomplete)");
  }
  file_->commit();
  file_.reset();
}

void save_safetensors(const fs::path& dest, const std::vector<OwnedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const OwnedTensor& t : tensors) specs.push_back({t.name, t.dtype, t.shape});
  SafetensorsWriter w(dest, specs, metadata);  // validates the shapes first
  for (size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].bytes.size() != specs[i].nbytes())
      fail(dest.string(), ": tensor '", tensors[i].name, "' ", dtype_name(tensors[i].dtype), " ",
           shape_str(tensors[i].shape), " needs ", specs[i].nbytes(), " bytes, got ", tensors[i].bytes.size());
  for (const OwnedTensor& t : tensors) w.write(t.bytes);
  w.commit();
}

void write_safetensors_index(const fs::path& dest, uint64_t total_size,
                             const std::map<std::string, std::string>& weight_map) {
  nlohmann::ordered_json j;
  j["metadata"] = {{"total_size", total_size}};
  j["weight_map"] = weight_map;
  std::string text;
  try {
    text = j.dump(2) + "\n";
  } catch (const nlohmann::ordered_json::exception& e) {
    fail(dest.string(), ": cannot write the index: ", e.what());
  }
  write_file_atomic(dest, text);
}

}  // namespace qlora
