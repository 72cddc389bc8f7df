#include "core/dtype.h"

#include <array>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace qlora {

namespace {
struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
  bool is_float;
};
constexpr std::array<DTypeInfo, 15> kInfo = {{
    {DType::F64, "F64", 8, true},         {DType::F32, "F32", 4, true},
    {DType::F16, "F16", 2, true},         {DType::BF16, "BF16", 2, true},
    {DType::F8_E4M3, "F8_E4M3", 1, true}, {DType::F8_E5M2, "F8_E5M2", 1, true},
    {DType::I64, "I64", 8, false},        {DType::I32, "I32", 4, false},
    {DType::I16, "I16", 2, false},        {DType::I8, "I8", 1, false},
    {DType::U64, "U64", 8, false},        {DType::U32, "U32", 4, false},
    {DType::U16, "U16", 2, false},        {DType::U8, "U8", 1, false},
    {DType::BOOL, "BOOL", 1, false},
}};
const DTypeInfo& info(DType t) { return kInfo[static_cast<size_t>(t)]; }
}  // namespace

std::string_view dtype_name(DType t) { return info(t).name; }
size_t dtype_size(DType t) { return info(t).size; }
bool dtype_is_float(DType t) { return info(t).is_float; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& i : kInfo)
    if (i.name == name) return i.type;
  return std::nullopt;
}

std::string_view dtype_all_names() {
  return "F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL";
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (man << 13));
  return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t f32_to_f16(float f) {
  const uint32_t b = f32_bits(f);
  const uint16_t sign = uint16_t((b >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return uint16_t(sign | 0x7e00u);
  if (a >= 65520.0f) return uint16_t(sign | 0x7c00u);  // rounds to inf
  if (a < 6.103515625e-05f) {                          // subnormal half: a / 2^-24, RNE
    const float q = std::nearbyint(a * 16777216.0f);
    return uint16_t(sign | uint16_t(q));
  }
  uint32_t ab = b & 0x7fffffffu;
  ab += 0xfffu + ((ab >> 13) & 1u);  // RNE on the 13 dropped bits
  return uint16_t(sign | uint16_t(((ab >> 13) - (112u << 10)) & 0x7fffu));
}

float f8e4m3_to_f32(uint8_t v) {
  const bool neg = v & 0x80u;
  const uint32_t exp = (v >> 3) & 0xfu;
  const uint32_t man = v & 0x7u;
  float r;
  if (exp == 15 && man == 7) r = std::nanf("");
  else if (exp == 0) r = std::ldexp(float(man), -9);  // subnormal: man/8 * 2^-6
  else r = std::ldexp(1.0f + float(man) / 8.0f, int(exp) - 7);
  return neg ? -r : r;
}

float f8e5m2_to_f32(uint8_t v) { return f16_to_f32(uint16_t(v) << 8); }

namespace {
// Element i of a buffer with no alignment promise: a tensor in a safetensors
// file may start at any byte offset (an odd-length U8 tensor before it), so
// the bytes are copied out rather than read through a cast pointer, which is
// undefined behaviour when misaligned (UBSan, docs/reliability.md). The
// compiler turns the memcpy into one plain load.
template <class T>
T load_unaligned(const void* src, size_t i) {
  T v;
  std::memcpy(&v, static_cast<const unsigned char*>(src) + i * sizeof(T), sizeof(T));
  return v;
}
template <class T>
void store_unaligned(void* dst, size_t i, T v) {
  std::memcpy(static_cast<unsigned char*>(dst) + i * sizeof(T), &v, sizeof(T));
}
}  // namespace

void convert_to_f32(const void* src, DType t, size_t n, float* dst) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::F64:
      for (size_t i = 0; i < n; ++i) dst[i] = float(load_unaligned<double>(src, i));
      return;
    case DType::BF16:
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(load_unaligned<uint16_t>(src, i));
      return;
    case DType::F16:
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(load_unaligned<uint16_t>(src, i));
      return;
    case DType::F8_E4M3: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f8e4m3_to_f32(s[i]);
      return;
    }
    case DType::F8_E5M2: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f8e5m2_to_f32(s[i]);
      return;
    }
    default: fail("cannot convert dtype ", dtype_name(t), " to F32: not a floating-point type");
  }
}

void convert_from_f32(const float* src, size_t n, DType t, void* dst) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16:
      for (size_t i = 0; i < n; ++i) store_unaligned(dst, i, f32_to_bf16(src[i]));
      return;
    case DType::F16:
      for (size_t i = 0; i < n; ++i) store_unaligned(dst, i, f32_to_f16(src[i]));
      return;
    default: fail("cannot store F32 values as ", dtype_name(t), ": expected F32, F16 or BF16");
  }
}

}  // namespace qlora
