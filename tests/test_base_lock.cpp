// The base lock (train/base_lock.h): an adapter records the fingerprint of the
// base it was trained on, in its safetensors metadata, and generate, eval and
// merge refuse it over another base (naming both fingerprints) unless
// --allow-other-base; an adapter without one loads with a warning.
#include <gtest/gtest.h>

#include <string>

#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/builtin.h"
#include "test_models.h"
#include "testing.h"
#include "train/base_lock.h"
#include "train/checkpoint.h"
#include "train/peft_adapter.h"

namespace qlora {
namespace {

using testing::error_of;
using testing::run_qlora;

bool has(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

TEST(BaseLock, FingerprintIsKeptInTheSafetensorsMetadata) {
  const ModelConfig cfg = testing::tiny_gqa_config(2);
  const LoraWeights w = testing::random_lora(cfg, LoraConfig{}, 3);
  testing::ScratchDir d;
  save_peft_adapter(w, cfg, d / "with", "base", "0123456789abcdef");
  save_peft_adapter(w, cfg, d / "without", "base");
  EXPECT_EQ(adapter_base_fingerprint(d / "with"), "0123456789abcdef");
  EXPECT_EQ(adapter_base_fingerprint(d / "without"), "");
  // PEFT's own metadata stays as PEFT writes it; adapter_config.json gets no key of ours.
  const SafetensorsFile m(d / "with" / "adapter_model.safetensors");
  EXPECT_EQ(m.metadata().at("format"), "pt");
  EXPECT_FALSE(has(testing::read_bytes(d / "with" / "adapter_config.json"), "qlora"));
  // The adapter still loads as before.
  EXPECT_EQ(LoraWeights::load_peft(d / "with", cfg).flat_size(), w.flat_size());
}

TEST(BaseLock, SameBasePassesOtherBaseIsRefusedUnlessAllowed) {
  const ModelConfig cfg = testing::tiny_gqa_config(2);
  const LoraWeights w = testing::random_lora(cfg, LoraConfig{}, 3);
  testing::ScratchDir d;
  save_peft_adapter(w, cfg, d / "a", "base", "aaaaaaaaaaaaaaaa");
  save_peft_adapter(w, cfg, d / "none", "base");
  EXPECT_EQ(check_base_lock_fingerprint(d / "a", "aaaaaaaaaaaaaaaa", false), "");
  const std::string e = error_of([&] { check_base_lock_fingerprint(d / "a", "bbbbbbbbbbbbbbbb", false); });
  EXPECT_TRUE(has(e, (d / "a").string())) << e;
  EXPECT_TRUE(has(e, "aaaaaaaaaaaaaaaa")) << e;
  EXPECT_TRUE(has(e, "bbbbbbbbbbbbbbbb")) << e;
  EXPECT_TRUE(has(e, "--allow-other-base")) << e;
  const std::string allowed = check_base_lock_fingerprint(d / "a", "bbbbbbbbbbbbbbbb", true);
  EXPECT_TRUE(has(allowed, "warning:") && has(allowed, "aaaaaaaaaaaaaaaa")) << allowed;
  const std::string none = check_base_lock_fingerprint(d / "none", "bbbbbbbbbbbbbbbb", false);
  EXPECT_TRUE(has(none, "warning:") && has(none, "records no base fingerprint")) << none;
  // A folder without the adapter file names the file.
  const std::string missing = error_of([&] { check_base_lock_fingerprint(d / "nothing", "b", false); });
  EXPECT_TRUE(has(missing, "adapter_model.safetensors")) << missing;
}

// End to end on builtin:tiny: an adapter saved with the model's own
// fingerprint is applied silently; one recording another base is refused by
// generate, eval and merge, naming both fingerprints, and accepted with the flag.
TEST(BaseLock, CommandsRefuseAnAdapterOfAnotherBase) {
  const auto model = resolve_model_path("builtin:tiny");
  const ModelConfig cfg = load_model_config(model);
  const std::string fp = base_model_fingerprint(model);
  const LoraWeights w = testing::random_lora(cfg, LoraConfig{}, 5);
  testing::ScratchDir d;
  save_peft_adapter(w, cfg, d / "mine", "builtin:tiny", fp);
  save_peft_adapter(w, cfg, d / "other", "builtin:tiny", "feedfacefeedface");
  const std::string gen =
      "generate --model builtin:tiny --prompt-ids '1 2 3' --max-new-tokens 2 --device cpu ";
  auto r = run_qlora(gen + "--adapter '" + (d / "mine").string() + "'");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_FALSE(has(r.output, "warning: adapter")) << r.output;
  r = run_qlora(gen + "--adapter '" + (d / "other").string() + "'");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r.output, "feedfacefeedface") && has(r.output, fp)) << r.output;
  r = run_qlora(gen + "--adapter '" + (d / "other").string() + "' --allow-other-base");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(has(r.output, "applied anyway")) << r.output;
  const std::string data = std::string(QLORA_SOURCE_DIR) + "/recipes/data/legal-qa-val.jsonl";
  r = run_qlora("eval --model builtin:tiny --format alpaca --chat-template alpaca --data '" + data +
                "' --adapter '" + (d / "other").string() + "'");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r.output, "feedfacefeedface")) << r.output;
  r = run_qlora("merge --model builtin:tiny --adapter '" + (d / "other").string() + "' -o '" +
                (d / "merged").string() + "'");
  EXPECT_EQ(r.status, 1) << r.output;
  EXPECT_TRUE(has(r.output, "feedfacefeedface")) << r.output;
  EXPECT_FALSE(std::filesystem::exists(d / "merged"));
}

}  // namespace
}  // namespace qlora
