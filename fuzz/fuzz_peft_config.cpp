// A PEFT adapter_config.json (r, lora_alpha, target_modules, use_rslora...)
// beside valid adapter tensors, loaded as `--adapter`/lora.init/resume do.
#include "peft_fixture.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto& fx = fuzz::peft_fixture();
  const auto dir = fuzz::scratch() / "adapter-config";
  fuzz::put(dir / "adapter_model.safetensors", fx.tensors);
  fuzz::put(dir / "adapter_config.json", fuzz::as_text(data, size));
  fuzz::expect_only_qlora_errors([&] { (void)LoraWeights::load_peft(dir, fx.cfg); });
  fuzz::expect_only_qlora_errors([&] { (void)load_matching_adapter(dir, LoraWeights(fx.cfg, fx.lc), fx.cfg); });
  return 0;
}
