#include "tools/export_gguf.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/json_parse.h"
#include "io/gguf_writer.h"
#include "io/hf_config.h"
#include "model/builtin.h"
#include "model/gguf_names.h"
#include "model/lora.h"
#include "model/tensor_table.h"
#include "tools/gguf_metadata.h"

namespace qlora {

namespace fs = std::filesystem;

namespace {

TensorKind base_kind(LoraTarget t) {
  switch (t) {
    case LoraTarget::Q:
      return TensorKind::Q;
    case LoraTarget::K:
      return TensorKind::K;
    case LoraTarget::V:
      return TensorKind::V;
    case LoraTarget::O:
      return TensorKind::O;
    case LoraTarget::Gate:
      return TensorKind::Gate;
    case LoraTarget::Up:
      return TensorKind::Up;
    case LoraTarget::Down:
      return TensorKind::Down;
  }
  fail("internal: unknown LoRA target");
}

// The base model an adapter names, when it is here: a folder, a GGUF file
// or builtin:NAME. Anything else (a Hub id) needs --model.
fs::path adapter_base(const fs::path& adapter) {
  const fs::path cfg_path = adapter / "adapter_config.json";
  std::ifstream in(cfg_path);
  if (!in) fail("cannot open ", cfg_path.string(), " (expected a PEFT adapter folder)");
  nlohmann::json j;
  try {
    j = parse_json(in, cfg_path.string());
  } catch (const nlohmann::json::exception& e) {
    fail(cfg_path.string(), ": invalid JSON: ", e.what());
  }
  const std::string base = j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string()
                               ? j["base_model_name_or_path"].get<std::string>()
                               : std::string();
  if (base.empty())
    fail(cfg_path.string(),
         ": no base_model_name_or_path; pass --model with the base model (folder or .gguf)");
  if (is_builtin_model(base)) return resolve_model_path(base);
  std::error_code ec;
  if (fs::exists(base, ec)) return base;
  fail(cfg_path.string(), ": base_model_name_or_path \"", base,
       "\" is not a folder or file here; pass --model with the base model (folder or .gguf)");
}

}  // namespace

GgmlType adapter_gguf_type_from_name(std::string_view name) {
  if (name == "f32" || name == "float32") return GgmlType::F32;
  if (name == "f16" || name == "float16") return GgmlType::F16;
  if (name == "bf16" || name == "bfloat16") return GgmlType::BF16;
  fail("--dtype \"", name, "\": expected f32, f16 or bf16");
}

AdapterExportReport export_adapter_gguf(const fs::path& adapter, const fs::path& output,
                                        const AdapterExportOptions& opt) {
  if (opt.type != GgmlType::F32 && opt.type != GgmlType::F16 && opt.type != GgmlType::BF16)
    fail("export: adapter type ", ggml_type_name(opt.type), " is not supported (expected F32, F16 or BF16)");
  if (!fs::is_directory(adapter))
    fail(adapter.string(),
         ": not an adapter folder (expected adapter_config.json + adapter_model.safetensors)");
  if (fs::exists(output) && !opt.overwrite)
    fail(output.string(), " already exists (pass --overwrite to replace it)");
  if (fs::is_directory(output)) fail(output.string(), " is a folder; the GGUF adapter is one file");

  AdapterExportReport rep;
  rep.model = opt.model.empty() ? adapter_base(adapter) : opt.model;
  const ModelConfig cfg = load_model_config(rep.model);
  // Checks every tensor's name and shape against this base.
  const LoraWeights lora = LoraWeights::load_peft(adapter, cfg);
  const LoraConfig& lc = lora.config();
  // llama.cpp's adapter format is lora_a/lora_b pairs and one alpha: its
  // convert_lora_to_gguf.py exits on a lora_magnitude_vector tensor and
  // llama-adapter.cpp throws on an unknown suffix, so a DoRA adapter has no
  // faithful GGUF adapter form. Merging applies the magnitudes exactly.
  if (lc.dora)
    fail((adapter / "adapter_config.json").string(), ": use_dora is true; llama.cpp's LoRA adapter GGUF has no "
         "DoRA magnitudes (lora_magnitude_vector), so it cannot be exported as an adapter; merge it instead "
         "(qlora merge --model ... --adapter ... -o model.gguf)");
  rep.architecture = gguf_architecture(cfg.arch);
  rep.rank = lc.rank;
  rep.alpha = lc.alpha;
  rep.rslora = lc.rslora;
  // llama.cpp: scale = alpha / r, where PEFT's is alpha / r or alpha / sqrt(r).
  rep.written_alpha = lc.rslora ? lc.alpha * std::sqrt(double(lc.rank)) : lc.alpha;
  if (float(rep.written_alpha) == 0.0f)
    fail(adapter.string(), ": lora_alpha is 0 (the adapter changes nothing); llama.cpp reads alpha 0 as ",
         "\"unscaled\" and would apply it with scale 1, so it is not exported");

  GgufWriter w(output);
  w.add_string("general.architecture", rep.architecture);
  w.add_string("general.type", "adapter");
  w.add_string("general.name", adapter.filename().empty() ? adapter.parent_path().filename().string()
                                                          : adapter.filename().string());
  w.add_string("adapter.type", "lora");
  w.add_f32("adapter.lora.alpha", float(rep.written_alpha));

  struct Item {
    int64_t layer;
    LoraTarget target;
    bool is_a;
  };
  std::vector<Item> items;
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    for (int t = 0; t < kNumLoraTargets; ++t) {
      const LoraTarget tg = LoraTarget(t);
      if (!lora.has(tg)) continue;
      const auto [in, out] = lora_target_dims(cfg, tg);
      const int64_t R = lora.rank(l, tg);
      const std::string base = gguf_module_name(base_kind(tg), l) + ".weight";
      w.add_tensor(base + ".lora_a", {in, R}, opt.type);   // A [R, IN]
      w.add_tensor(base + ".lora_b", {R, out}, opt.type);  // B [OUT, R]
      items.push_back({l, tg, true});
      items.push_back({l, tg, false});
    }
  std::vector<float> buf;
  std::vector<uint8_t> bytes;
  for (const Item& it : items) {
    const auto [in, out] = lora_target_dims(cfg, it.target);
    const float* src = it.is_a ? lora.A(it.layer, it.target) : lora.B(it.layer, it.target);
    const int64_t R = lora.rank(it.layer, it.target);
    const int64_t n = it.is_a ? R * in : out * R;
    buf.assign(src, src + n);
    // llama.cpp scales every module by the file's one alpha over that
    // module's rank (its lora_a's rows). A module whose own scale differs
    // (alpha_pattern, or rsLoRA under rank_pattern) has the ratio folded
    // into its B (one fp32 multiply; nothing changes where the ratio is 1).
    if (!it.is_a) {
      const double fold = double(lora.scale(it.layer, it.target)) * double(R) / rep.written_alpha;
      if (float(fold) != 1.0f)
        for (float& x : buf) x = float(double(x) * fold);
    }
    // lora_b's rows are the projection's output rows: in the base's GGUF order.
    if (!it.is_a)
      if (const int64_t heads = gguf_qk_heads(cfg, base_kind(it.target)); heads > 0)
        qk_rows_to_gguf(buf.data(), out, R, heads);
    if (opt.type == GgmlType::F32) {
      w.write(buf.data(), buf.size() * sizeof(float));
    } else {
      const DType dt = opt.type == GgmlType::F16 ? DType::F16 : DType::BF16;
      bytes.resize(buf.size() * 2);
      convert_from_f32(buf.data(), buf.size(), dt, bytes.data());
      w.write(bytes.data(), bytes.size());
    }
  }
  rep.tensors = int64_t(items.size());
  w.commit();
  rep.output_bytes = fs::file_size(output);
  return rep;
}

}  // namespace qlora
