// A model's config.json (Llama, Mistral, Qwen2; rope_scaling, tied embeddings...).
#include "fuzz_util.h"
#include "io/hf_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto file = fuzz::scratch() / "config.json";
  fuzz::put(file, fuzz::as_text(data, size));
  fuzz::expect_only_qlora_errors([&] { (void)load_model_config(file); });
  return 0;
}
