// An integer read from a JSON file without undefined behaviour. nlohmann's
// get<int64_t>() of a floating-point value (1e99) casts it out of range, which
// UBSan stops on (found by fuzz/fuzz_peft_config: "r": 1444...4); a negative
// value read as unsigned wraps. Here both are errors naming the key.
#pragma once

#include <cstdint>
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

}  // namespace qlora
