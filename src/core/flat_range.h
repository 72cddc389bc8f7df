// A half-open range of the flat LoRA parameter array (LoraWeights::flat_params):
// what the optimizer's LoRA+ learning-rate groups are made of.
#pragma once

#include <cstddef>

namespace qlora {

struct FlatRange {
  size_t begin = 0, end = 0;  // [begin, end)
};

}  // namespace qlora
