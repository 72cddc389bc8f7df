// Element types of tensors, named as safetensors names them, with the
// scalar conversions every part of the program shares.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace qlora {

enum class DType : uint8_t {
  F64, F32, F16, BF16, F8_E4M3, F8_E5M2,
  I64, I32, I16, I8, U64, U32, U16, U8, BOOL,
};

// "F32", "BF16", ... exactly as written in a safetensors header.
std::string_view dtype_name(DType t);
// nullopt for a name safetensors does not define (or we do not support).
std::optional<DType> dtype_from_name(std::string_view name);
size_t dtype_size(DType t);
bool dtype_is_float(DType t);
// Comma-separated list of every supported name, for error messages.
std::string_view dtype_all_names();

// ---- scalar conversions (bit-exact, round-to-nearest-even where narrowing) ----

inline float f32_from_bits(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t f32_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }
// Round to nearest even, as torch's .to(torch.bfloat16) does; NaN stays a quiet NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t b = f32_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x0040u);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float f8e4m3_to_f32(uint8_t v);  // OCP E4M3FN: no infinities, 0x7f/0xff are NaN
float f8e5m2_to_f32(uint8_t v);

// Converts n elements of a floating type (F64/F32/F16/BF16/F8_*) to fp32.
// Throws qlora::Error for a non-float dtype.
void convert_to_f32(const void* src, DType t, size_t n, float* dst);
// Converts n fp32 values to F32, F16 or BF16 storage.
void convert_from_f32(const float* src, size_t n, DType t, void* dst);

}  // namespace qlora
