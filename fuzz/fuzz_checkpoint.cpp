// A checkpoint's state.json (step, cursor, RNG, losses, hashes), read as
// --resume does: listed, read, checked for compatibility.
#include "fuzz_util.h"
#include "train/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qlora;
  const auto out = fuzz::scratch() / "run";
  const auto ckpt = checkpoint_path(out, 1);
  fuzz::put(ckpt / "state.json", fuzz::as_text(data, size));
  fuzz::expect_only_qlora_errors([&] {
    (void)list_checkpoints(out);
    const TrainState s = read_train_state(ckpt);
    check_resume_compatible(s, s.recipe_hash, s.base_fingerprint);
  });
  return 0;
}
