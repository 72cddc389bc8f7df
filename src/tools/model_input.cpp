#include "tools/model_input.h"

#include <algorithm>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/json_parse.h"
#include "io/gguf_config.h"
#include "quant/bnb_layout.h"
#include "tokenizer/gguf_vocab.h"
#include "tools/model_folder.h"

namespace qlora {

namespace fs = std::filesystem;

ModelInput::ModelInput(const fs::path& path) : path_(path) {
  if (is_gguf_file(path)) {
    gguf_ = std::make_unique<GgufModel>(path);
    cfg_ = gguf_->config();
    slots_ = gguf_->slots();
    bnb_.assign(slots_.size(), false);
    return;
  }
  if (!fs::is_directory(path))
    fail(path.string(),
         ": not a model (expected a folder with config.json + *.safetensors, or a .gguf file)");
  cfg_ = load_model_config(path);
  st_ = std::make_unique<SafetensorsModel>(path);
  const SafetensorsModel& m = *st_;
  // A 4-bit weight counts with the logical shape of its quant state.
  const std::vector<std::string> bnb = bnb_quantized_weights(m);
  const auto is_bnb = [&](const std::string& n) { return std::binary_search(bnb.begin(), bnb.end(), n); };
  std::vector<PresentTensor> present;
  for (const auto& name : m.names()) {
    if (is_bnb_companion(name) || is_ignorable_tensor(name)) continue;
    present.push_back({name, is_bnb(name) ? check_bnb_weight(m, name).shape : m.at(name).info->shape});
  }
  slots_ = expected_tensors(cfg_);
  const TensorCheck check = check_tensors(slots_, present);
  if (!check.ok())
    fail(m.source().string(), " does not match ", path.string(), "/config.json:\n", check.report());
  for (const TensorSlot& s : slots_) {
    bnb_.push_back(is_bnb(s.name));
    const auto& e = m.at(s.name);
    if (!bnb_.back() && !dtype_is_float(e.info->dtype))
      fail(e.file->path().string(), ": tensor ", s.name, " has dtype ", dtype_name(e.info->dtype),
           ", expected a floating point type");
  }
}

StoredTensor ModelInput::tensor(size_t i) const {
  StoredTensor t;
  if (gguf_) {
    t.owned = gguf_->read(i);
    t.bytes = {reinterpret_cast<const uint8_t*>(t.owned.data()), t.owned.size() * sizeof(float)};
    t.dtype = DType::F32;
    return t;
  }
  const auto& e = st_->at(slots_.at(i).name);
  t.bytes = e.file->data(*e.info);
  t.dtype = e.info->dtype;
  t.file = e.file;
  return t;
}

uint64_t ModelInput::stored_bytes(size_t i) const {
  if (gguf_) return gguf_->tensor(i).nbytes;
  return st_->at(slots_.at(i).name).info->nbytes();
}

nlohmann::ordered_json ModelInput::config_json() const {
  const std::string text =
      gguf_ ? gguf_config_json(gguf_->file()).dump() : read_text_file(path_ / "config.json");
  try {
    return parse_json<nlohmann::ordered_json>(text, (path_ / "config.json").string());
  } catch (const nlohmann::json::exception& e) {
    fail(path_.string(), "/config.json: invalid JSON: ", e.what());
  }
}

void ModelInput::write_side_files(const fs::path& out) const {
  if (!gguf_) return copy_model_side_files(path_, out);
  const GgufTokenizerFiles tok = gguf_tokenizer_files(gguf_->file());
  if (!tok.spm_model.empty()) write_file_atomic(out / "tokenizer.model", tok.spm_model);
  if (!tok.tokenizer_json.is_null())
    write_file_atomic(out / "tokenizer.json", tok.tokenizer_json.dump(2) + "\n");
  write_file_atomic(out / "tokenizer_config.json", tok.tokenizer_config.dump(2) + "\n");
  const nlohmann::ordered_json cj = config_json();
  nlohmann::ordered_json gen = {{"bos_token_id", cj["bos_token_id"]}, {"eos_token_id", cj["eos_token_id"]}};
  write_file_atomic(out / "generation_config.json", gen.dump(2) + "\n");
}

}  // namespace qlora
