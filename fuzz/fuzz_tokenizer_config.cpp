// tokenizer_config.json (bos/eos tokens, add_bos_token, chat_template) and
// the chat template detection on its chat_template, or on the raw input.
#include "data/chat_template.h"
#include "fuzz_util.h"
#include "tokenizer/loaders.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto dir = fuzz::scratch() / "tok";
  fuzz::put(dir / "tokenizer_config.json", fuzz::as_text(data, size));
  (void)ChatTemplate::detect(fuzz::as_text(data, size));
  fuzz::expect_only_qlora_errors([&] {
    const tok::TokenizerConfig c = tok::read_tokenizer_config(dir);
    if (c.chat_template) {
      (void)ChatTemplate::detect(*c.chat_template);
      (void)ChatTemplate::resolve("auto", c.chat_template);
    }
  });
  return 0;
}
