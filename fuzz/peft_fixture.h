// The model the PEFT and checkpoint targets load against: builtin:tiny's
// config, and a valid rank-1 q_proj adapter (a few KB) written once per
// process; each input then replaces one file of it.
#pragma once

#include "fuzz_util.h"
#include "io/hf_config.h"
#include "model/builtin.h"
#include "model/lora.h"
#include "train/peft_adapter.h"

namespace qlora::fuzz {

struct PeftFixture {
  ModelConfig cfg;
  LoraConfig lc;
  std::filesystem::path adapter;  // a folder holding the valid adapter
  std::string config_json, tensors;  // its two files' bytes
};

inline const PeftFixture& peft_fixture() {
  static const PeftFixture fx = [] {
    PeftFixture f;
    write_builtin_model("tiny", scratch() / "tiny");
    f.cfg = load_model_config(scratch() / "tiny");
    f.lc.rank = 1;
    f.lc.alpha = 2;
    f.lc.targets.fill(false);
    f.lc.targets[0] = true;  // q_proj
    LoraWeights w(f.cfg, f.lc);
    w.init_default(1);
    f.adapter = scratch() / "valid-adapter";
    save_peft_adapter(w, f.cfg, f.adapter, "builtin:tiny");
    auto slurp = [](const std::filesystem::path& p) {
      std::ifstream in(p, std::ios::binary);
      return std::string(std::istreambuf_iterator<char>(in), {});
    };
    f.config_json = slurp(f.adapter / "adapter_config.json");
    f.tensors = slurp(f.adapter / "adapter_model.safetensors");
    return f;
  }();
  return fx;
}

}  // namespace qlora::fuzz
