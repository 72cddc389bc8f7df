// A SentencePiece tokenizer.model (a serialized ModelProto), loaded and used.
#include "fuzz_util.h"
#include "tokenizer/loaders.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  fuzz::expect_only_qlora_errors([&] {
    const auto tok = tok::load_sentencepiece(std::string(fuzz::as_text(data, size)), "tokenizer.model", {});
    const auto ids = tok->encode("Hello wörld 123\n\t  \xe6\x97\xa5\xe6\x9c\xac", true);
    (void)tok->decode(ids, false);
  });
  return 0;
}
