// A PEFT adapter_model.safetensors (names, shapes, dtypes of lora_A/lora_B)
// beside a valid adapter_config.json.
#include "peft_fixture.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto& fx = fuzz::peft_fixture();
  const auto dir = fuzz::scratch() / "adapter-tensors";
  fuzz::put(dir / "adapter_config.json", fx.config_json);
  fuzz::put(dir / "adapter_model.safetensors", fuzz::as_text(data, size));
  fuzz::expect_only_qlora_errors([&] { (void)load_matching_adapter(dir, LoraWeights(fx.cfg, fx.lc), fx.cfg); });
  return 0;
}
