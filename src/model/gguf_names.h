// llama.cpp's names and row order for the tensors of the tensor table.
//
// GGUF files name tensors "blk.<i>.attn_q.weight" where HF folders say
// "model.layers.<i>.self_attn.q_proj.weight", and llama.cpp's converter
// stores the q and k projections of "llama" models (Llama, Mistral, SmolLM)
// with the two halves of each head's rows interleaved, because llama.cpp's
// RoPE rotates adjacent pairs where transformers rotates half against half.
// "qwen2" files keep HF's order (llama.cpp rotates them NEOX-style).
#pragma once

#include <cstdint>
#include <string>

#include "io/hf_config.h"
#include "model/tensor_table.h"

namespace qlora {

// "blk.3.attn_q.weight" for the slot of model.layers.3.self_attn.q_proj.weight.
std::string gguf_tensor_name(const TensorSlot& s);
// "blk.3.attn_q" (no .weight): the base name an adapter's tensors extend.
std::string gguf_module_name(TensorKind kind, int64_t layer);

// Whether a GGUF file of this architecture stores q/k rows interleaved.
bool gguf_interleaves_qk(Arch a);
// Heads whose rows a q or k tensor (weight or bias) holds: num_attention_heads
// for Q, num_key_value_heads for K; 0 for every other kind (no reordering).
int64_t gguf_qk_heads(const ModelConfig& cfg, TensorKind kind);

// The row reordering, in place, of a (rows, cols) row-major matrix whose rows
// are `heads` heads of rows/heads each (a bias is cols = 1).
// GGUF -> HF: hf[h*D + s*D/2 + i] = gguf[h*D + 2*i + s]; HF -> GGUF inverts it.
void qk_rows_from_gguf(float* w, int64_t rows, int64_t cols, int64_t heads);
void qk_rows_to_gguf(float* w, int64_t rows, int64_t cols, int64_t heads);

}  // namespace qlora
