// A GGUF file: header, metadata of every value type, tensor infos, data;
// then what a GGUF model is read through: its config and its tokenizer.
#include "fuzz_util.h"
#include "io/gguf.h"
#include "io/gguf_config.h"
#include "tokenizer/gguf_vocab.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto file = fuzz::scratch() / "model.gguf";
  fuzz::put(file, fuzz::as_text(data, size));
  fuzz::expect_only_qlora_errors([&] {
    const GgufFile f(file);
    volatile uint64_t sum = 0;
    for (const auto& t : f.tensors()) {
      const auto bytes = f.data(t);
      if (!bytes.empty()) sum = sum + bytes.front() + bytes.back();
    }
    fuzz::expect_only_qlora_errors([&] { (void)gguf_model_config(f); });
    fuzz::expect_only_qlora_errors([&] {
      const auto tok = load_gguf_tokenizer(f);
      (void)tok->decode(tok->encode("Hello wörld 123", true));
    });
  });
  return 0;
}
