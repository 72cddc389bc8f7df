#include "quant/bnb_layout.h"

#include <charconv>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_integer.h"
#include "core/json_parse.h"
#include "quant/dynamic_map.h"

namespace qlora {

namespace {

constexpr std::string_view kStatePrefix = ".quant_state.bitsandbytes__";

template <typename T>
std::vector<uint8_t> as_bytes(const T* p, size_t n) {
  std::vector<uint8_t> b(n * sizeof(T));
  if (n) std::memcpy(b.data(), p, b.size());
  return b;
}

std::vector<float> code4_table(Quant4Type t) {
  std::vector<float> v(16);
  for (int c = 0; c < 16; ++c) v[size_t(c)] = quant4_code_value(t, uint8_t(c));
  return v;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

BnbNames bnb_names(const std::string& w, Quant4Type t) {
  return {w,
          w + ".absmax",
          w + ".quant_map",
          w + ".nested_absmax",
          w + ".nested_quant_map",
          w + std::string(kStatePrefix) + std::string(quant4_name(t))};
}

std::string_view torch_dtype_name(DType t) {
  switch (t) {
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    case DType::F32: return "float32";
    default: fail("bitsandbytes 4-bit weights must come from F32, F16 or BF16, not ", dtype_name(t));
  }
}

DType dtype_from_torch_name(std::string_view s, const std::string& where) {
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  if (s == "float32") return DType::F32;
  fail(where, ": dtype \"", s, "\" is not supported (expected bfloat16, float16 or float32)");
}

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  // Shortest round-trip digits in scientific form: "-d.ddde+XX".
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string s(buf, r.ptr);
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exp = std::stoi(s.substr(e + 1));
  std::string digits = s.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  std::string out;
  if (exp >= -4 && exp < 16) {  // Python's repr switches to exponent form outside [1e-4, 1e16)
    if (exp < 0) {
      out = "0." + std::string(size_t(-exp - 1), '0') + digits;
    } else if (size_t(exp) + 1 >= digits.size()) {
      out = digits + std::string(size_t(exp) + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, size_t(exp) + 1) + "." + digits.substr(size_t(exp) + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  }
  return neg ? "-" + out : out;
}

std::string bnb_quant_state_json(const Quant4Tensor& q, DType dtype) {
  // json.dumps with its default separators (", " and ": "), keys in the order
  // QuantState.as_dict inserts them.
  std::string s = str("{\"quant_type\": \"", quant4_name(q.type), "\", \"blocksize\": ", q.block,
                      ", \"dtype\": \"", torch_dtype_name(dtype), "\", \"shape\": [");
  for (size_t i = 0; i < q.shape.size(); ++i) s += str(i ? ", " : "", q.shape[i]);
  s += "]";
  if (q.nested) {
    s += str(", \"nested_blocksize\": ", q.nested->nested_block, ", \"nested_dtype\": \"float32\", ",
             "\"nested_offset\": ", python_float_repr(double(q.nested->offset)));
  }
  return s + "}";
}

std::vector<TensorSpec> bnb_tensor_specs_before_state(const std::string& w, const Shape& shape, Quant4Type t,
                                                      int64_t block, bool double_quant) {
  const BnbNames nm = bnb_names(w, t);
  const int64_t n = shape_numel(shape);
  const int64_t blocks = quant4_num_blocks(n, block);
  std::vector<TensorSpec> specs;
  specs.push_back({nm.weight, DType::U8, {quant4_code_bytes(n), 1}});
  specs.push_back({nm.absmax, double_quant ? DType::U8 : DType::F32, {blocks}});
  specs.push_back({nm.quant_map, DType::F32, {16}});
  if (double_quant) {
    specs.push_back({nm.nested_absmax, DType::F32, {quant4_num_blocks(blocks, kNestedBlock)}});
    specs.push_back({nm.nested_quant_map, DType::F32, {256}});
  }
  return specs;
}

std::vector<OwnedTensor> bnb_tensors(const std::string& w, const Quant4Tensor& q, DType dtype) {
  const std::vector<TensorSpec> specs =
      bnb_tensor_specs_before_state(w, q.shape, q.type, q.block, q.nested.has_value());
  std::vector<OwnedTensor> out;
  auto add = [&](const TensorSpec& s, std::vector<uint8_t> bytes) {
    out.push_back({s.name, s.dtype, s.shape, std::move(bytes)});
  };
  add(specs[0], q.codes);
  const std::vector<float> map4 = code4_table(q.type);
  if (q.nested) {
    add(specs[1], q.nested->codes);
    add(specs[2], as_bytes(map4.data(), 16));
    add(specs[3], as_bytes(q.nested->nested_absmax.data(), q.nested->nested_absmax.size()));
    const float* code8 = q.nested->code8.empty() ? dynamic_map_signed().data() : q.nested->code8.data();
    add(specs[4], as_bytes(code8, 256));
  } else {
    add(specs[1], as_bytes(q.absmax.data(), q.absmax.size()));
    add(specs[2], as_bytes(map4.data(), 16));
  }
  const std::string json = bnb_quant_state_json(q, dtype);
  out.push_back({bnb_names(w, q.type).quant_state, DType::U8, {int64_t(json.size())},
                 std::vector<uint8_t>(json.begin(), json.end())});
  return out;
}

BnbQuantState parse_bnb_quant_state(std::span<const uint8_t> bytes, const std::string& where) {
  nlohmann::json j;
  try {
    j = parse_json(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), where);
  } catch (const nlohmann::json::exception& e) {
    fail(where, ": quant state is not valid JSON: ", e.what());
  }
  if (!j.is_object()) fail(where, ": quant state must be a JSON object");
  auto need = [&](const char* key) -> const nlohmann::json& {
    if (!j.contains(key)) fail(where, ": quant state lacks \"", key, "\"");
    return j.at(key);
  };
  auto positive_int = [&](const char* key) {
    const auto v = json_integer_within(need(key), 1, INT64_MAX);
    if (!v) fail(where, ": quant state \"", key, "\" must be a positive integer");
    return *v;
  };
  BnbQuantState st;
  const auto& qt = need("quant_type");
  if (!qt.is_string() || !quant4_from_name(qt.get<std::string>()))
    fail(where, ": quant_type must be \"nf4\" or \"fp4\"");
  st.type = *quant4_from_name(qt.get<std::string>());
  st.block = positive_int("blocksize");
  if (!valid_block4(st.block)) fail(where, ": blocksize ", st.block, " is not a power of two in 32..4096");
  const auto& dt = need("dtype");
  if (!dt.is_string()) fail(where, ": quant state \"dtype\" must be a string");
  st.dtype = dtype_from_torch_name(dt.get<std::string>(), where);
  const auto& sh = need("shape");
  if (!sh.is_array()) fail(where, ": quant state \"shape\" must be a list of integers");
  for (const auto& d : sh) {
    const auto n = json_integer_within(d, 0, INT64_MAX);
    if (!n) fail(where, ": quant state \"shape\" must be a list of non-negative integers");
    st.shape.push_back(*n);
  }
  st.nested = j.contains("nested_offset") || j.contains("nested_blocksize");
  if (st.nested) {
    st.nested_block = positive_int("nested_blocksize");
    const auto& off = need("nested_offset");
    if (!off.is_number()) fail(where, ": quant state \"nested_offset\" must be a number");
    st.nested_offset = static_cast<float>(off.get<double>());
    if (!std::isfinite(st.nested_offset))
      fail(where, ": quant state \"nested_offset\" is not a finite float32");
    const auto& nd = need("nested_dtype");
    if (!nd.is_string() || nd.get<std::string>() != "float32")
      fail(where, ": nested_dtype must be \"float32\"");
  }
  return st;
}

bool is_bnb_companion(std::string_view name) {
  for (std::string_view s : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"})
    if (ends_with(name, s)) return true;
  return name.find(kStatePrefix) != std::string_view::npos;
}

std::vector<std::string> bnb_quantized_weights(const SafetensorsModel& m) {
  std::vector<std::string> out;
  for (const std::string& n : m.names()) {
    const size_t p = n.find(kStatePrefix);
    if (p != std::string::npos) out.push_back(n.substr(0, p));
  }
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

std::span<const uint8_t> expect_tensor(const SafetensorsModel& m, const std::string& name, DType dtype,
                                       int64_t numel) {
  const SafetensorsModel::Entry* e = m.find(name);
  if (!e) fail(m.source().string(), ": tensor ", name, " is missing (part of a bitsandbytes 4-bit weight)");
  const std::string where = e->file->path().string() + ": tensor " + name;
  if (e->info->dtype != dtype)
    fail(where, " has dtype ", dtype_name(e->info->dtype), ", expected ", dtype_name(dtype));
  if (e->info->numel() != numel)
    fail(where, " has ", e->info->numel(), " elements, expected ", numel, " for its quant state");
  return e->file->data(*e->info);
}

template <typename T>
std::vector<T> copy_as(std::span<const uint8_t> b) {
  std::vector<T> v(b.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), b.data(), b.size());
  return v;
}

}  // namespace

BnbQuantState check_bnb_weight(const SafetensorsModel& m, const std::string& w) {
  // The quant state tensor names the type; find whichever is present.
  const SafetensorsModel::Entry* st_entry = nullptr;
  Quant4Type type = Quant4Type::NF4;
  for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4})
    if (const auto* e = m.find(bnb_names(w, t).quant_state)) st_entry = e, type = t;
  if (!st_entry) fail(m.source().string(), ": ", w, " has no quant_state.bitsandbytes__nf4|fp4 tensor");
  const BnbNames nm = bnb_names(w, type);
  const std::string where = st_entry->file->path().string() + ": " + nm.quant_state;
  const BnbQuantState st = parse_bnb_quant_state(st_entry->file->data(*st_entry->info), where);
  if (st.type != type) fail(where, ": quant_type \"", quant4_name(st.type), "\" disagrees with the tensor name");

  const int64_t n = shape_numel(st.shape);
  const int64_t blocks = quant4_num_blocks(n, st.block);
  expect_tensor(m, nm.weight, DType::U8, quant4_code_bytes(n));
  const auto map4 = copy_as<float>(expect_tensor(m, nm.quant_map, DType::F32, 16));
  const auto ours = code4_table(st.type);
  for (size_t i = 0; i < 16; ++i)
    if (std::fabs(map4[i] - ours[i]) > 1e-6f)
      fail(m.source().string(), ": ", nm.quant_map, " is not the standard ", quant4_name(st.type),
           " code book (entry ", i, " is ", map4[i], ", expected ", ours[i], ")");
  if (st.nested) {
    expect_tensor(m, nm.absmax, DType::U8, blocks);
    expect_tensor(m, nm.nested_absmax, DType::F32, quant4_num_blocks(blocks, st.nested_block));
    expect_tensor(m, nm.nested_quant_map, DType::F32, 256);
  } else {
    expect_tensor(m, nm.absmax, DType::F32, blocks);
  }
  return st;
}

Quant4Tensor load_bnb_weight(const SafetensorsModel& m, const std::string& w, DType* dtype) {
  const BnbQuantState st = check_bnb_weight(m, w);
  const BnbNames nm = bnb_names(w, st.type);
  Quant4Tensor q;
  q.type = st.type;
  q.block = st.block;
  q.shape = st.shape;
  q.codes = copy_as<uint8_t>(m.data(nm.weight));
  if (st.nested) {
    NestedAbsmax nq;
    nq.offset = st.nested_offset;
    nq.nested_block = st.nested_block;
    nq.codes = copy_as<uint8_t>(m.data(nm.absmax));
    nq.nested_absmax = copy_as<float>(m.data(nm.nested_absmax));
    nq.code8 = copy_as<float>(m.data(nm.nested_quant_map));
    q.nested = std::move(nq);
  } else {
    q.absmax = copy_as<float>(m.data(nm.absmax));
  }
  if (dtype) *dtype = st.dtype;
  return q;
}

}  // namespace qlora
