// A .safetensors file: the 8-byte header length, the JSON header (dtypes,
// shapes, offsets, __metadata__) and the data section.
#include "fuzz_util.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto file = fuzz::scratch() / "model.safetensors";
  fuzz::put(file, fuzz::as_text(data, size));
  fuzz::expect_only_qlora_errors([&] {
    const SafetensorsFile f(file);
    volatile uint64_t sum = 0;
    for (const auto& t : f.tensors()) {
      const auto bytes = f.data(t);
      if (!bytes.empty()) sum = sum + bytes.front() + bytes.back();  // every span must lie in the file
      if (uint64_t(t.numel()) * dtype_size(t.dtype) != t.nbytes()) std::abort();
    }
    for (const auto& [k, v] : f.metadata()) sum = sum + k.size() + v.size();
  });
  return 0;
}
