// The tensor element types of ggml / GGUF files (llama.cpp), as data: the id
// written in a GGUF tensor info, the name llama.cpp prints, and the block
// layout (values per block, bytes per block). The reader needs the sizes of
// every type, supported or not, to validate a file; quant/ggml_quants says
// which ones can be dequantized.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace qlora {

// Ids as in ggml.h (gaps are types ggml has removed).
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
};

struct GgmlTypeTraits {
  GgmlType type;
  std::string_view name;  // "Q4_K", as llama.cpp and gguf-py name it
  int64_t block_values;   // values per block (1 for plain types)
  int64_t block_bytes;    // bytes per block
};

// nullopt for an id no ggml version defines (or one it removed).
std::optional<GgmlTypeTraits> ggml_type_traits(uint32_t id);
inline GgmlTypeTraits ggml_traits(GgmlType t) {
  return *ggml_type_traits(uint32_t(t));
}
inline std::string_view ggml_type_name(GgmlType t) {
  return ggml_traits(t).name;
}

// Bytes of n values of type t; nullopt when n is not a whole number of blocks
// (or the size overflows).
std::optional<uint64_t> ggml_nbytes(GgmlType t, int64_t n);

}  // namespace qlora
