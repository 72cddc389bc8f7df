#include "recipe/byte_size.h"

#include <array>
#include <cctype>

namespace qlora {
namespace {

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i])))
      return false;
  return true;
}

struct Unit {
  const char* name;
  double bytes;
};

constexpr std::array<Unit, 9> kUnits{{{"B", 1.0},
                                      {"KB", 1e3},
                                      {"MB", 1e6},
                                      {"GB", 1e9},
                                      {"TB", 1e12},
                                      {"KiB", 1024.0},
                                      {"MiB", 1024.0 * 1024},
                                      {"GiB", 1024.0 * 1024 * 1024},
                                      {"TiB", 1024.0 * 1024 * 1024 * 1024}}};

}  // namespace

std::optional<uint64_t> parse_byte_size(std::string_view text) {
  // The number by hand rather than strtod: strtod accepts "inf", "0x1p3",
  // exponents and leading spaces, none of which is a size.
  size_t i = 0;
  uint64_t int_part = 0;
  size_t digits = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
    if (int_part > (UINT64_MAX - 9) / 10) return std::nullopt;
    int_part = int_part * 10 + static_cast<uint64_t>(text[i] - '0');
    ++i, ++digits;
  }
  long double frac = 0.0L, scale = 0.1L;
  if (i < text.size() && text[i] == '.') {
    ++i;
    size_t frac_digits = 0;
    while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
      frac += scale * (text[i] - '0');
      scale /= 10;
      ++i, ++frac_digits;
    }
    if (frac_digits == 0) return std::nullopt;
  }
  if (digits == 0) return std::nullopt;
  if (i < text.size() && text[i] == ' ') ++i;
  const std::string_view unit = text.substr(i);
  for (const Unit& u : kUnits) {
    if (!iequals(unit, u.name)) continue;
    const long double bytes = (static_cast<long double>(int_part) + frac) * static_cast<long double>(u.bytes);
    const long double rounded = bytes + 0.5L;
    if (rounded >= 18446744073709551616.0L) return std::nullopt;  // 2^64: does not fit
    return static_cast<uint64_t>(rounded);
  }
  return std::nullopt;
}

}  // namespace qlora
