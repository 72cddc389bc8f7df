// Per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern, matched
// as peft.utils.other.get_pattern_key matches them) and LoRA+ (PEFT's
// create_loraplus_optimizer: B and 1-d parameters at lr x ratio).
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/lora.h"
#include "test_models.h"
#include "testing.h"
#include "train/optimizer.h"
#include "train/peft_adapter.h"

namespace qlora {
namespace {

int64_t rank_at(const std::vector<LoraModuleParams>& p, int64_t l, LoraTarget t) {
  return p[size_t(l * kNumLoraTargets + int64_t(t))].rank;
}
double alpha_at(const std::vector<LoraModuleParams>& p, int64_t l, LoraTarget t) {
  return p[size_t(l * kNumLoraTargets + int64_t(t))].alpha;
}

// PEFT's rule: key k matches module name n when re.match(rf"(.*\.)?({k})$", n):
// the key must cover whole trailing dot-separated parts (or be a regex that
// does). Expected values worked out from that rule by hand (and checked with
// PEFT in tests/interop/test_peft.py::test_rank_pattern_round_trip).
TEST(LoraPatterns, MatchLikePeft) {
  const ModelConfig cfg = testing::tiny_gqa_config(3);
  LoraConfig lc;
  lc.rank = 8;
  lc.alpha = 16;
  lc.rank_pattern = {{"down_proj", 2},                          // every layer's down_proj
                     {"layers.1.self_attn.q_proj", 3},          // one module by its path tail
                     {"model\\.layers\\.[02]\\.mlp\\.up_proj", 5},  // a regex
                     {"q_proj", 6}};                             // after the layer-1 key: it loses there
  lc.alpha_pattern = {{"k_proj", 4.5}, {"layers.2.self_attn.k_proj", 99.0}};  // the first match wins
  const auto p = lora_module_params(cfg, lc);
  for (int64_t l = 0; l < 3; ++l) {
    EXPECT_EQ(rank_at(p, l, LoraTarget::Down), 2);
    EXPECT_EQ(rank_at(p, l, LoraTarget::Q), l == 1 ? 3 : 6);
    EXPECT_EQ(rank_at(p, l, LoraTarget::Up), l == 1 ? 8 : 5);
    EXPECT_EQ(rank_at(p, l, LoraTarget::K), 8);
    EXPECT_EQ(rank_at(p, l, LoraTarget::Gate), 8);
    EXPECT_EQ(alpha_at(p, l, LoraTarget::K), 4.5);
    EXPECT_EQ(alpha_at(p, l, LoraTarget::V), 16.0);
  }
  // scale = alpha / r of the module itself (rsLoRA: alpha / sqrt(r)).
  EXPECT_EQ(p[size_t(1 * kNumLoraTargets + int(LoraTarget::Q))].scale, float(16.0 / 3.0));
  lc.rslora = true;
  EXPECT_EQ(lora_module_params(cfg, lc)[size_t(int(LoraTarget::Down))].scale, float(16.0 / std::sqrt(2.0)));
  EXPECT_EQ(lora_max_rank(cfg, lc, LoraTarget::Q), 6);
  EXPECT_EQ(lora_max_rank(cfg, lc, LoraTarget::Down), 2);
}

TEST(LoraPatterns, KeysMustCoverWholeNameParts) {
  const ModelConfig cfg = testing::tiny_gqa_config(2);
  for (const char* key : {"proj", "_proj", "own_proj", "layers.0", "mlp", "model.layers.5.mlp.down_proj"}) {
    LoraConfig lc;
    lc.rank_pattern = {{key, 2}};
    const std::string e = testing::error_of([&] { lora_module_params(cfg, lc); });
    EXPECT_NE(e.find(std::string("rank_pattern key '") + key + "' matches no module of this model"),
              std::string::npos)
        << e;
    EXPECT_NE(e.find("model.layers.N.mlp.{gate,up,down}_proj for N in 0..1"), std::string::npos) << e;
  }
  LoraConfig lc;
  lc.alpha_pattern = {{"(unclosed", 2.0}};
  EXPECT_NE(testing::error_of([&] { lora_module_params(cfg, lc); }).find("alpha_pattern key '(unclosed'"),
            std::string::npos);
  lc.alpha_pattern = {{"o_proj", 0.0}};
  EXPECT_NE(testing::error_of([&] { lora_module_params(cfg, lc); }).find("alpha must be a number > 0"),
            std::string::npos);
}

// The adapter is laid out per module; PEFT's files carry each module's own
// shape and the patterns in their order; reading them back is bit for bit.
TEST(LoraPatterns, AdapterRoundTripKeepsPatternsShapesAndOrder) {
  const ModelConfig cfg = testing::tiny_gqa_config(3);
  LoraConfig lc;
  lc.rank = 4;
  lc.alpha = 8;
  lc.rank_pattern = {{"v_proj", 2}, {"layers.0.mlp.down_proj", 6}, {"down_proj", 1}};
  lc.alpha_pattern = {{"up_proj", 3.5}, {"gate_proj", 12}};
  const LoraWeights w = testing::random_lora(cfg, lc, 21);
  EXPECT_EQ(w.rank(0, LoraTarget::Down), 6);
  EXPECT_EQ(w.rank(2, LoraTarget::Down), 1);
  EXPECT_EQ(w.scale(1, LoraTarget::Up), float(3.5 / 4.0));
  testing::ScratchDir dir;
  save_peft_adapter(w, cfg, dir / "a", "base");
  const std::string text = testing::read_bytes(dir / "a" / "adapter_config.json");
  // In the order given (the first matching key wins), with PEFT's value types.
  EXPECT_NE(text.find("\"rank_pattern\": {\n    \"v_proj\": 2,\n    \"layers.0.mlp.down_proj\": 6,\n    "
                      "\"down_proj\": 1\n  }"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("\"alpha_pattern\": {\n    \"up_proj\": 3.5,\n    \"gate_proj\": 12\n  }"), std::string::npos)
      << text;
  const SafetensorsFile st(dir / "a" / "adapter_model.safetensors");
  EXPECT_EQ(st.find(w.peft_name(0, LoraTarget::Down, true))->shape, (Shape{6, 48}));
  EXPECT_EQ(st.find(w.peft_name(1, LoraTarget::Down, false))->shape, (Shape{32, 1}));
  EXPECT_EQ(st.find(w.peft_name(2, LoraTarget::V, true))->shape, (Shape{2, 32}));
  const LoraWeights r = LoraWeights::load_peft(dir / "a", cfg);
  EXPECT_EQ(r.config().rank_pattern, lc.rank_pattern);
  EXPECT_EQ(r.config().alpha_pattern, lc.alpha_pattern);
  ASSERT_EQ(r.flat_size(), w.flat_size());
  EXPECT_EQ(std::memcmp(r.flat_params(), w.flat_params(), w.flat_size() * sizeof(float)), 0);
  // Continuing from it with other patterns is refused naming the module.
  LoraConfig other = lc;
  other.rank_pattern = {{"v_proj", 2}, {"down_proj", 1}};
  const LoraWeights like(cfg, other);
  const std::string e = testing::error_of([&] { load_matching_adapter(dir / "a", like, cfg); });
  EXPECT_NE(e.find("module model.layers.0.mlp.down_proj has r=6"), std::string::npos) << e;
}

// PEFT's create_loraplus_optimizer: lora_B and every 1-d parameter (DoRA's
// magnitudes) in the lr x ratio group, the rest (lora_A) at lr.
TEST(LoraPlus, RangesAreTheBsAndMagnitudes) {
  const ModelConfig cfg = testing::tiny_gqa_config(2);
  for (bool dora : {false, true}) {
    LoraConfig lc;
    lc.rank = 3;
    lc.rank_pattern = {{"o_proj", 5}};
    lc.dora = dora;
    const LoraWeights w(cfg, lc);
    std::vector<char> plus(w.flat_size(), 0);
    for (const FlatRange& r : w.plus_ranges()) {
      ASSERT_LE(r.end, w.flat_size());
      for (size_t i = r.begin; i < r.end; ++i) plus[i] = 1;
    }
    size_t expect = 0, got = 0;
    for (int64_t l = 0; l < 2; ++l)
      for (int t = 0; t < kNumLoraTargets; ++t) {
        const LoraTarget tg = LoraTarget(t);
        const auto [in, out] = lora_target_dims(cfg, tg);
        const int64_t R = w.rank(l, tg);
        auto all = [&](const float* p, int64_t n, char v) {
          for (int64_t i = 0; i < n; ++i) EXPECT_EQ(plus[size_t(p - w.flat_params() + i)], v);
        };
        all(w.A(l, tg), R * in, 0);
        all(w.B(l, tg), out * R, 1);
        expect += size_t(out * R);
        if (dora) {
          all(w.M(l, tg), out, 1);
          expect += size_t(out);
        } else {
          EXPECT_EQ(w.M(l, tg), nullptr);
        }
      }
    for (char c : plus) got += size_t(c);
    EXPECT_EQ(got, expect);
  }
}

// With ratio k, the elements in the ranges take exactly the update of a plain
// optimizer at lr x k, the others that at lr (each group is torch's
// single-tensor update at its own lr; AdamW's bias correction counts the same
// steps in both groups). Bit for bit, over steps with a changing lr.
TEST(LoraPlus, OptimizerStepsTheRangesAtRatioTimesLr) {
  for (OptimizerKind kind : {OptimizerKind::adamw, OptimizerKind::sgd}) {
    OptimizerConfig c;
    c.kind = kind;
    c.weight_decay = 0.05;
    c.momentum = kind == OptimizerKind::sgd ? 0.9 : 0.0;
    const size_t n = 1000;
    const std::vector<FlatRange> ranges = {{0, 10}, {100, 333}, {500, 501}, {990, 1000}};
    OptimizerConfig plus = c;
    plus.plus_lr_ratio = 16.0;
    Optimizer opt(plus, n, ranges), at_lr(c, n), at_klr(c, n);
    std::vector<float> p = testing::randn(int64_t(n), 3), p_lr = p, p_klr = p;
    for (int step = 0; step < 4; ++step) {
      const std::vector<float> g = testing::randn(int64_t(n), 10 + unsigned(step), 0.1f);
      const double lr = 1e-3 * (1 + step);
      opt.step(p.data(), g.data(), lr);
      at_lr.step(p_lr.data(), g.data(), lr);
      at_klr.step(p_klr.data(), g.data(), lr * 16.0);
    }
    std::vector<char> in(n, 0);
    for (const FlatRange& r : ranges)
      for (size_t i = r.begin; i < r.end; ++i) in[i] = 1;
    int bad = 0;
    for (size_t i = 0; i < n; ++i) {
      const float want = in[i] ? p_klr[i] : p_lr[i];
      if (std::memcmp(&p[i], &want, 4) != 0 && bad++ < 5)
        ADD_FAILURE() << optimizer_kind_name(kind) << " [" << i << "] " << p[i] << " vs " << want;
    }
    EXPECT_NE(p_lr[5], p_klr[5]);  // the two learning rates do differ
  }
  EXPECT_NE(testing::error_of([] { Optimizer(OptimizerConfig{}, 10, {{5, 3}}); }).find("LoRA+ ranges"),
            std::string::npos);
  OptimizerConfig bad;
  bad.plus_lr_ratio = 0.0;
  EXPECT_NE(testing::error_of([&] { Optimizer(bad, 10); }).find("lora.plus_lr_ratio must be > 0"), std::string::npos);
}

}  // namespace
}  // namespace qlora
