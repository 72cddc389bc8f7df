// An integer read from a JSON file without undefined behaviour. nlohmann's
// get<int64_t>() of a floating-point value (1e99) casts it out of range, which
// UBSan stops on (found by fuzz/fuzz_peft_config: "r": 1444...4); a negative
// value read as unsigned wraps. Here both are errors naming the key.
//
// Every integer that comes from a file goes through one of these, never
// through get<int>(), get<int64_t>(), get<size_t>() or value("key", 0)
// (docs/reliability.md).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>

#include "core/error.h"

namespace qlora {

template <class Int, class Json>
Int json_integer(const Json& v, std::string_view where) {
  static_assert(std::is_same_v<Int, int64_t> || std::is_same_v<Int, uint64_t>);
  if (!v.is_number_integer()) fail(where, " must be an integer, got ", v.type_name());
  if constexpr (std::is_same_v<Int, uint64_t>) {
    if (!v.is_number_unsigned()) fail(where, " must be an integer >= 0, got ", v.template get<int64_t>());
  } else {
    if (v.is_number_unsigned() && v.template get<uint64_t>() > uint64_t(INT64_MAX))
      fail(where, " is too large: ", v.template get<uint64_t>());
  }
  return v.template get<Int>();
}

// The value when it is a JSON integer (not 4.0, not 1e99) in [lo, hi];
// nullopt otherwise. For readers that skip what they do not understand.
template <class Json>
std::optional<int64_t> json_integer_within(const Json& v, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) return std::nullopt;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.template get<uint64_t>();
    if (hi < 0 || u > uint64_t(hi) || (lo > 0 && u < uint64_t(lo))) return std::nullopt;
    return int64_t(u);
  }
  const int64_t i = v.template get<int64_t>();
  if (i < lo || i > hi) return std::nullopt;
  return i;
}

// An integer in [lo, hi], or an error naming `where` and the range: a count
// or an id that sizes a table is bounded here, before anything is allocated.
template <class Json>
int64_t json_integer_in(const Json& v, std::string_view where, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) fail(where, " must be an integer, got ", v.type_name());
  if (const auto i = json_integer_within(v, lo, hi)) return *i;
  if (v.is_number_unsigned())
    fail(where, " must be in [", lo, ", ", hi, "], got ", v.template get<uint64_t>());
  fail(where, " must be in [", lo, ", ", hi, "], got ", v.template get<int64_t>());
}

}  // namespace qlora
