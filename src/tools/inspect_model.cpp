#include "tools/inspect_model.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/progress.h"
#include "io/gguf.h"
#include "io/gguf_config.h"
#include "model/gguf_names.h"
#include "model/tensor_table.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

// A GGUF model: its tensors under their llama.cpp names and ggml types, the
// configuration its metadata describes, and the tensor table checked in
// llama.cpp's names.
Inspection inspect_gguf(const fs::path& path) {
  Inspection in;
  in.source = path;
  const GgufFile f(path);
  in.files = 1;
  in.file_bytes = fs::file_size(path);
  std::map<std::string, int64_t> types;
  for (const GgufTensorInfo& t : f.tensors()) {
    in.tensors.push_back({t.name, std::string(ggml_type_name(t.type)), t.shape(), t.nbytes, std::nullopt,
                          path.filename().string()});
    ++types[std::string(ggml_type_name(t.type))];
    if (ggml_traits(t.type).block_values > 1) {
      in.quantized_tensors++;
      in.quantized_params += t.numel();
      in.quantized_bytes += t.nbytes;
    }
  }
  for (const auto& [name, n] : types) in.gguf_types += str(in.gguf_types.empty() ? "" : ", ", name, " x", n);
  std::sort(in.tensors.begin(), in.tensors.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  for (const auto& t : in.tensors) {
    in.params += shape_numel(t.shape);
    in.bytes += t.bytes;
  }
  try {
    in.config = gguf_model_config(f);
  } catch (const Error& e) {
    in.problems.push_back(e.what());
    return in;
  }
  std::vector<TensorSlot> expected = expected_tensors(*in.config);
  for (TensorSlot& s : expected) s.name = gguf_tensor_name(s);
  std::vector<PresentTensor> present;
  for (const auto& t : in.tensors)
    if (t.name != "rope_freqs.weight") present.push_back({t.name, t.shape});
  const TensorCheck check = check_tensors(expected, present);
  std::istringstream lines(check.ok() ? "" : check.report());
  for (std::string l; std::getline(lines, l);)
    if (!l.empty()) in.problems.push_back(l);
  return in;
}

}  // namespace

Inspection inspect_model(const fs::path& path) {
  Inspection in;
  in.source = path;
  if (!fs::exists(path)) fail(path.string(), ": no such file or folder");
  if (is_gguf_file(path)) return inspect_gguf(path);
  if (fs::is_directory(path) && fs::exists(path / "config.json")) in.config = load_model_config(path);
  const SafetensorsModel model(path);
  in.files = model.files().size();
  for (const auto& f : model.files()) in.file_bytes += f->file_size();

  const std::vector<std::string> quantized = bnb_quantized_weights(model);
  for (const std::string& w : quantized) {
    // Validated without copying: inspecting a 70B checkpoint reads headers, not 35 GB of codes.
    const BnbQuantState st = check_bnb_weight(model, w);
    InspectedTensor t;
    t.name = w;
    t.dtype = st.type == Quant4Type::NF4 ? "NF4" : "FP4";
    t.shape = st.shape;
    t.quant = st;
    t.file = model.at(w).file->path().filename().string();
    const BnbNames nm = bnb_names(w, st.type);
    for (const std::string& n :
         {nm.weight, nm.absmax, nm.quant_map, nm.nested_absmax, nm.nested_quant_map, nm.quant_state})
      if (const auto* e = model.find(n)) t.bytes += e->info->nbytes();
    in.quantized_tensors++;
    in.quantized_params += shape_numel(st.shape);
    in.quantized_bytes += t.bytes;
    in.tensors.push_back(std::move(t));
  }
  const auto is_part_of_quantized = [&](const std::string& n) {
    if (std::binary_search(quantized.begin(), quantized.end(), n)) return true;
    if (!is_bnb_companion(n)) return false;
    for (const auto& w : quantized)
      if (n.size() > w.size() && n.compare(0, w.size(), w) == 0 && n[w.size()] == '.') return true;
    return false;
  };
  for (const std::string& n : model.names()) {
    if (is_part_of_quantized(n)) continue;
    const auto& e = model.at(n);
    in.tensors.push_back({n, std::string(dtype_name(e.info->dtype)), e.info->shape, e.info->nbytes(),
                          std::nullopt, e.file->path().filename().string()});
  }
  std::sort(in.tensors.begin(), in.tensors.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  for (const auto& t : in.tensors) {
    in.params += shape_numel(t.shape);
    in.bytes += t.bytes;
  }
  if (in.config) {
    std::vector<PresentTensor> present;
    for (const auto& t : in.tensors) present.push_back({t.name, t.shape});
    const TensorCheck check = check_tensors(expected_tensors(*in.config), present);
    if (!check.ok()) {
      std::istringstream lines(check.report());
      for (std::string l; std::getline(lines, l);)
        if (!l.empty()) in.problems.push_back(l);
    }
  }
  return in;
}

namespace {

std::string with_commas(int64_t v) {
  const std::string digits = std::to_string(v);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out.push_back(',');
    out.push_back(digits[i]);
  }
  return out;
}

std::string str_fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string quant_summary(const BnbQuantState& q) {
  return str(quant4_name(q.type), " block ", q.block, q.nested ? " +double-quant" : "", " (",
             torch_dtype_name(q.dtype), ")");
}

}  // namespace

std::string inspection_text(const Inspection& in) {
  std::ostringstream os;
  os << "source        " << in.source.string() << "\n";
  if (in.config) {
    const ModelConfig& c = *in.config;
    os << "architecture  " << arch_name(c.arch) << ": " << c.num_hidden_layers << " layers, hidden "
       << c.hidden_size << ", mlp " << c.intermediate_size << ", heads " << c.num_attention_heads << " (kv "
       << c.num_key_value_heads << ", dim " << c.head_dim << "), vocab " << c.vocab_size << ", rope "
       << rope_scaling_name(c.rope_scaling.type) << " theta " << c.rope_theta
       << (c.tie_word_embeddings ? ", tied embeddings" : "") << "\n";
  } else {
    os << "architecture  unknown (no config.json)\n";
  }
  os << "parameters    " << with_commas(in.params) << "\n";
  if (!in.gguf_types.empty()) {
    os << "quantization  GGUF " << in.gguf_types << ": " << in.quantized_tensors
       << " block-quantized tensors, "
       << str_fixed(in.quantized_params ? double(in.quantized_bytes) * 8 / double(in.quantized_params) : 0.0,
                    3)
       << " bits/parameter\n";
  } else if (in.quantized_tensors) {
    const auto it = std::find_if(in.tensors.begin(), in.tensors.end(), [](const auto& t) { return t.quant; });
    os << "quantization  bitsandbytes " << quant_summary(*it->quant) << ": " << in.quantized_tensors
       << " tensors, " << with_commas(in.quantized_params) << " parameters ("
       << str_fixed(in.params ? 100.0 * double(in.quantized_params) / double(in.params) : 0.0, 1) << "%), "
       << str_fixed(in.quantized_params ? double(in.quantized_bytes) * 8 / double(in.quantized_params) : 0.0,
                    3)
       << " bits/parameter\n";
  } else {
    os << "quantization  none\n";
  }
  char bpp[32];
  std::snprintf(bpp, sizeof bpp, "%.3f", in.bits_per_param());
  os << "size          " << human_bytes(in.bytes) << " of tensors in " << in.files << " file"
     << (in.files == 1 ? "" : "s") << " (" << human_bytes(in.file_bytes) << " on disk), " << bpp
     << " bits/parameter\n";
  for (const auto& p : in.problems) os << "problem       " << p << "\n";
  size_t wname = 4;
  for (const auto& t : in.tensors) wname = std::max(wname, t.name.size());
  os << "\n";
  char line[512];
  std::snprintf(line, sizeof line, "%-*s  %-7s  %-16s  %12s  %s\n", int(wname), "name", "dtype", "shape",
                "bytes", "quantization");
  os << line;
  for (const auto& t : in.tensors) {
    std::snprintf(line, sizeof line, "%-*s  %-7s  %-16s  %12llu  %s\n", int(wname), t.name.c_str(),
                  t.dtype.c_str(), shape_str(t.shape).c_str(), static_cast<unsigned long long>(t.bytes),
                  t.quant ? quant_summary(*t.quant).c_str() : "");
    os << line;
  }
  return os.str();
}

std::string inspection_json(const Inspection& in) {
  nlohmann::ordered_json j;
  j["source"] = in.source.string();
  if (in.config) {
    const ModelConfig& c = *in.config;
    j["architecture"] = {{"model_type", c.model_type},
                         {"layers", c.num_hidden_layers},
                         {"hidden_size", c.hidden_size},
                         {"intermediate_size", c.intermediate_size},
                         {"attention_heads", c.num_attention_heads},
                         {"kv_heads", c.num_key_value_heads},
                         {"head_dim", c.head_dim},
                         {"vocab_size", c.vocab_size},
                         {"rope_scaling", rope_scaling_name(c.rope_scaling.type)},
                         {"rope_theta", c.rope_theta},
                         {"tie_word_embeddings", c.tie_word_embeddings}};
  } else {
    j["architecture"] = nullptr;
  }
  j["parameters"] = in.params;
  j["tensor_bytes"] = in.bytes;
  j["file_bytes"] = in.file_bytes;
  j["files"] = in.files;
  j["bits_per_parameter"] = in.bits_per_param();
  j["quantized_tensors"] = in.quantized_tensors;
  j["quantized_parameters"] = in.quantized_params;
  j["quantized_bytes"] = in.quantized_bytes;
  if (!in.gguf_types.empty()) j["gguf_types"] = in.gguf_types;
  j["problems"] = in.problems;
  nlohmann::ordered_json ts = nlohmann::ordered_json::array();
  for (const auto& t : in.tensors) {
    nlohmann::ordered_json e = {
        {"name", t.name}, {"dtype", t.dtype}, {"shape", t.shape}, {"bytes", t.bytes}, {"file", t.file}};
    if (t.quant)
      e["quant"] = {{"type", quant4_name(t.quant->type)},
                    {"block_size", t.quant->block},
                    {"double_quant", t.quant->nested},
                    {"dtype", torch_dtype_name(t.quant->dtype)}};
    ts.push_back(std::move(e));
  }
  j["tensors"] = std::move(ts);
  return j.dump(2) + "\n";
}

}  // namespace qlora
