// Byte sizes as people write them: "24GiB", "48GB", "80000MiB", "1.5TiB".
// Shared by the recipe (device.memory_budget) and the memory planner.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace qlora {

// A decimal number (digits, optionally one '.' and more digits) followed by a
// unit, optionally separated by one space. Units, case-insensitive: B; KB MB
// GB TB (powers of 1000, as disk and GPU vendors count); KiB MiB GiB TiB
// (powers of 1024). A unit is required: a bare "24" is nullopt (24 bytes is
// never what was meant). The value is rounded to whole bytes; nullopt when the
// text is anything else or the size does not fit in 64 bits.
std::optional<uint64_t> parse_byte_size(std::string_view text);

}  // namespace qlora
