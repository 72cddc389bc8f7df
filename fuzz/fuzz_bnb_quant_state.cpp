// The bitsandbytes quant-state JSON stored as a U8 tensor beside each 4-bit
// weight of a pre-quantized model (quant_type, blocksize, dtype, shape, nested...).
#include "fuzz_util.h"
#include "quant/bnb_layout.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  fuzz::expect_only_qlora_errors(
      [&] { (void)parse_bnb_quant_state(std::span<const uint8_t>(data, size), "w.quant_state"); });
  return 0;
}
