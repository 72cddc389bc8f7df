#include "model/gguf_names.h"

#include <algorithm>
#include <vector>

#include "core/error.h"

namespace qlora {

std::string gguf_module_name(TensorKind kind, int64_t layer) {
  const std::string blk = "blk." + std::to_string(layer) + ".";
  switch (kind) {
    case TensorKind::Embed:
      return "token_embd";
    case TensorKind::FinalNorm:
      return "output_norm";
    case TensorKind::LmHead:
      return "output";
    case TensorKind::AttnNorm:
      return blk + "attn_norm";
    case TensorKind::MlpNorm:
      return blk + "ffn_norm";
    case TensorKind::QNorm:
      return blk + "attn_q_norm";
    case TensorKind::KNorm:
      return blk + "attn_k_norm";
    case TensorKind::Q:
    case TensorKind::QBias:
      return blk + "attn_q";
    case TensorKind::K:
    case TensorKind::KBias:
      return blk + "attn_k";
    case TensorKind::V:
    case TensorKind::VBias:
      return blk + "attn_v";
    case TensorKind::O:
    case TensorKind::OBias:
      return blk + "attn_output";
    case TensorKind::Gate:
    case TensorKind::GateBias:
      return blk + "ffn_gate";
    case TensorKind::Up:
    case TensorKind::UpBias:
      return blk + "ffn_up";
    case TensorKind::Down:
    case TensorKind::DownBias:
      return blk + "ffn_down";
  }
  fail("internal: no GGUF name for tensor kind ", tensor_kind_name(kind));
}

std::string gguf_tensor_name(const TensorSlot& s) {
  switch (s.kind) {
    case TensorKind::QBias:
    case TensorKind::KBias:
    case TensorKind::VBias:
    case TensorKind::OBias:
    case TensorKind::GateBias:
    case TensorKind::UpBias:
    case TensorKind::DownBias:
      return gguf_module_name(s.kind, s.layer) + ".bias";
    default:
      return gguf_module_name(s.kind, s.layer) + ".weight";
  }
}

bool gguf_interleaves_qk(Arch a) {
  return a == Arch::Llama || a == Arch::Mistral;
}

int64_t gguf_qk_heads(const ModelConfig& cfg, TensorKind kind) {
  if (!gguf_interleaves_qk(cfg.arch)) return 0;
  if (kind == TensorKind::Q || kind == TensorKind::QBias) return cfg.num_attention_heads;
  if (kind == TensorKind::K || kind == TensorKind::KBias) return cfg.num_key_value_heads;
  return 0;
}

namespace {

// to_gguf: row h*D + s*D/2 + i of HF goes to row h*D + 2*i + s.
void reorder(float* w, int64_t rows, int64_t cols, int64_t heads, bool to_gguf) {
  if (heads <= 0 || rows % heads != 0 || (rows / heads) % 2 != 0)
    fail("internal: cannot reorder ", rows, " q/k rows as ", heads, " heads of an even size");
  const int64_t D = rows / heads, half = D / 2;
  std::vector<float> head(size_t(D * cols));
  for (int64_t h = 0; h < heads; ++h) {
    float* base = w + h * D * cols;
    std::copy(base, base + D * cols, head.begin());
    for (int64_t s = 0; s < 2; ++s)
      for (int64_t i = 0; i < half; ++i) {
        const int64_t hf = s * half + i, gg = 2 * i + s;
        const int64_t dst = to_gguf ? gg : hf, src = to_gguf ? hf : gg;
        std::copy(head.begin() + src * cols, head.begin() + (src + 1) * cols, base + dst * cols);
      }
  }
}

}  // namespace

void qk_rows_from_gguf(float* w, int64_t rows, int64_t cols, int64_t heads) {
  reorder(w, rows, cols, heads, false);
}
void qk_rows_to_gguf(float* w, int64_t rows, int64_t cols, int64_t heads) {
  reorder(w, rows, cols, heads, true);
}

}  // namespace qlora
