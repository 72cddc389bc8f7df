// Pieces every tool that writes a Hugging Face model folder shares (quantize,
// merge): shard file names, copying the non-weight files (tokenizer,
// generation config, chat template, licence), reading config.json as text,
// and converting a range of a mapped tensor to fp32 in parallel.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>

#include "core/dtype.h"

namespace qlora {

// "model.safetensors" when count == 1, else transformers' naming
// "model-00001-of-00003.safetensors" (index is 0-based).
std::string shard_file_name(size_t index, size_t count);

// True for files that hold weights (or an index of them) in any format we
// know: they are never copied beside newly written weights.
bool is_weight_file(const std::filesystem::path& p);

// Copies every regular file of `from` except weight files and config.json
// into `to`; errors name the file.
void copy_model_side_files(const std::filesystem::path& from, const std::filesystem::path& to);

std::string read_text_file(const std::filesystem::path& p);

// Converts elements [begin, end) of a tensor stored as `t` to fp32, in parallel.
void tensor_range_to_f32(std::span<const uint8_t> src, DType t, int64_t begin, int64_t end, float* out);

}  // namespace qlora
