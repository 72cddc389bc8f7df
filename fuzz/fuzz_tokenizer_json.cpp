// A Hugging Face tokenizer.json (BPE or SentencePiece-style: model, merges,
// added tokens, normalizer, pre-tokenizer, decoder); loaded, then used on a
// fixed text with specials, and the ids decoded back.
#include "fuzz_util.h"
#include "tokenizer/loaders.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto file = fuzz::scratch() / "tokenizer.json";
  fuzz::put(file, fuzz::as_text(data, size));
  fuzz::expect_only_qlora_errors([&] {
    const auto tok = tok::load_tokenizer_json(file, {});
    const auto ids = tok->encode("Hello wörld 123 <s>\n\t  \xe6\x97\xa5\xe6\x9c\xac", true);
    (void)tok->decode(ids, false);
  });
  return 0;
}
