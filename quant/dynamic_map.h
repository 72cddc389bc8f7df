// The signed 8-bit dynamic map of bitsandbytes (create_dynamic_map(signed=True,
// max_exponent_bits=7, total_bits=8); Dettmers, "8-Bit Approximations for
// Parallelism in Deep Learning", arXiv 1511.04561): 256 sorted fp32 values in
// [-1, 1], dense near zero. Double quantization stores absmax scales with it.
#pragma once

#include <array>

namespace qlora {

const std::array<float, 256>& dynamic_map_signed();

}  // namespace qlora
