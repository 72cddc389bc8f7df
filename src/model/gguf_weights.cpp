#include "model/gguf_weights.h"

#include <cmath>

#include "core/error.h"
#include "io/gguf_config.h"
#include "model/gguf_names.h"
#include "quant/ggml_quants.h"

namespace qlora {

GgufModel::GgufModel(const std::filesystem::path& path) : file_(path) {
  const std::string where = file_.path().string();
  cfg_ = gguf_model_config(file_);
  if (cfg_.head_dim % 2 != 0) fail(where, ": head size ", cfg_.head_dim, " must be even for RoPE");
  slots_ = expected_tensors(cfg_);

  // The table in llama.cpp's names, so the report names what the file holds.
  std::vector<TensorSlot> expected = slots_;
  for (TensorSlot& s : expected) s.name = gguf_tensor_name(s);
  std::vector<PresentTensor> present;
  for (const GgufTensorInfo& t : file_.tensors())
    if (t.name != "rope_freqs.weight") present.push_back({t.name, t.shape()});
  const TensorCheck check = check_tensors(expected, present);
  if (!check.ok()) fail(where, " does not hold the tensors its metadata describes:\n", check.report());

  for (const TensorSlot& s : expected) {
    const GgufTensorInfo* t = file_.find_tensor(s.name);
    if (!ggml_can_dequantize(t->type))
      fail(where, ": tensor ", t->name, " has type ", ggml_type_name(t->type),
           ", which cannot be read; supported: ", ggml_dequantizable_names());
    tensors_.push_back(t);
  }
}

std::vector<float> GgufModel::read(size_t slot) const {
  const GgufTensorInfo& t = tensor(slot);
  const TensorSlot& s = slots_.at(slot);
  std::vector<float> v(size_t(t.numel()));
  ggml_dequantize(t.type, file_.data(t).data(), t.numel(), v.data());
  file_.release(t);
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i]))
      fail("tensor ", t.name, " in ", file_.path().string(), " holds a non-finite value (", v[i],
           ") at flat index ", i);
  if (const int64_t heads = gguf_qk_heads(cfg_, s.kind)) {
    const int64_t rows = s.shape[0];
    qk_rows_from_gguf(v.data(), rows, int64_t(v.size()) / rows, heads);
  }
  return v;
}

}  // namespace qlora
