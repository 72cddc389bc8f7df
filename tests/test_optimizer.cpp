// AdamW and SGD against torch.optim (golden file), gradient-norm clipping as
// torch.nn.utils.clip_grad_norm_, and the state round trip used by checkpoints.
// If the golden file's format changes, re-run:
//   /usr/bin/python3 tests/reference/make_optimizer_golden.py
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "testing.h"
#include "train/optimizer.h"

namespace qlora {
namespace {

constexpr const char* kRegen = "re-run /usr/bin/python3 tests/reference/make_optimizer_golden.py";

const SafetensorsFile& golden() {
  static const SafetensorsFile f(std::string(QLORA_SOURCE_DIR) +
                                 "/tests/reference/optimizer_golden.safetensors");
  return f;
}

std::vector<float> gtensor(const std::string& name) {
  return testing::golden_tensor<float>(golden(), name, kRegen);
}

// Tolerance. Both sides round every operation to fp32 with the constants
// rounded to fp32 first, in the same order; torch's vectorised kernels fuse
// the multiply-add of exp_avg/exp_avg_sq (and SGD's add) into FMAs, which we
// do not (-ffp-contract=off), so each step may differ by about one rounding of
// each quantity involved. Per element and step that is at most a few ulps of
// the element's magnitude plus a few ulps of the update (lr x a ratio of
// order 1); errors may add over steps. kUlps = 2 per step (measured with
// torch 1.13 on x86-64: under 1 unit after any number of steps).
constexpr double kUlps = 2.0;

struct Case {
  OptimizerConfig cfg;
  int64_t n = 0, steps = 0;
  std::vector<double> lrs;
};

Case load_case(const std::string& name) {
  const auto& md = golden().metadata();
  Case c;
  const auto cases = nlohmann::json::parse(md.at("cases"));
  const auto& j = cases.at(name);
  c.cfg.kind = parse_optimizer_kind(j.at("kind").get<std::string>());
  auto num = [&](const char* k, double dflt) {
    return j.contains(k) ? std::stod(j.at(k).get<std::string>()) : dflt;
  };
  c.cfg.beta1 = num("beta1", 0.9);
  c.cfg.beta2 = num("beta2", 0.999);
  c.cfg.eps = num("eps", 1e-8);
  c.cfg.weight_decay = num("weight_decay", 0.0);
  c.cfg.momentum = num("momentum", 0.0);
  for (const auto& s : nlohmann::json::parse(md.at("lrs"))) c.lrs.push_back(std::stod(s.get<std::string>()));
  c.steps = std::stoll(md.at("steps"));
  c.n = golden().find(name + ".params0")->shape[0];
  return c;
}

// |a - b| <= kUlps * steps * FLT_EPSILON * (|b| + scale) for every element.
void expect_close(const float* a, const std::vector<float>& b, double scale, int64_t steps,
                  const std::string& what) {
  ASSERT_FALSE(b.empty()) << what;
  int bad = 0;
  double worst = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    const double unit = FLT_EPSILON * (std::abs(double(b[i])) + scale);
    const double err = std::abs(double(a[i]) - double(b[i])) / unit;
    worst = std::max(worst, err);
    if (err > kUlps * double(steps) && bad++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: " << a[i] << " vs torch " << b[i] << " (" << err << " units)";
  }
  ::testing::Test::RecordProperty(what + ".worst_units", std::to_string(worst));
}

void run_case(const std::string& name) {
  SCOPED_TRACE(name);
  const auto& md = golden().metadata();
  ASSERT_EQ(md.at("magic"), "qlora-optimizer-golden") << kRegen;
  ASSERT_EQ(md.at("version"), "1") << kRegen;
  const Case c = load_case(name);
  std::vector<float> p = gtensor(name + ".params0");
  const std::vector<float> grads = gtensor(name + ".grads");
  const std::vector<float> after = gtensor(name + ".params");
  ASSERT_EQ(grads.size(), size_t(c.steps * c.n));
  ASSERT_EQ(after.size(), size_t(c.steps * c.n));
  Optimizer opt(c.cfg, size_t(c.n));
  EXPECT_EQ(opt.state_bytes(), optimizer_state_bytes(c.cfg, size_t(c.n)));
  const double max_lr = *std::max_element(c.lrs.begin(), c.lrs.end());
  float max_g = 0;
  for (float g : grads) max_g = std::max(max_g, std::abs(g));
  for (int64_t s = 0; s < c.steps; ++s) {
    opt.step(p.data(), grads.data() + s * c.n, c.lrs[size_t(s)]);
    EXPECT_EQ(opt.steps(), s + 1);
    const std::vector<float> want(after.begin() + s * c.n, after.begin() + (s + 1) * c.n);
    // The update of one step is lr times a ratio of order 1 (AdamW: |m^|/sqrt(v^)
    // <= about 1 for these betas; SGD: |buf| <= a few max|g|).
    const double update = c.cfg.kind == OptimizerKind::sgd ? max_lr * 10 * max_g : max_lr * 3;
    expect_close(p.data(), want, update, s + 1, str(name, ".params step ", s));
  }
  // The state after the last step.
  for (const auto& st : opt.state()) {
    const std::vector<float> want = gtensor(name + "." + st.name);
    ASSERT_EQ(st.n, want.size()) << st.name;
    const double scale = st.name == "exp_avg_sq" ? double(max_g) * max_g : 10.0 * max_g;
    expect_close(st.data, want, scale, c.steps, name + "." + st.name);
  }
  // And nothing more than torch has.
  const auto state = opt.state();
  for (const char* key : {"exp_avg", "exp_avg_sq", "momentum_buffer"}) {
    const bool ours = std::any_of(state.begin(), state.end(),
                                  [&](const Optimizer::StateTensor& t) { return t.name == key; });
    EXPECT_EQ(ours, golden().find(name + "." + key) != nullptr) << key;
  }
}

TEST(Optimizer, AdamWMatchesTorch) {
  run_case("adamw");
}
TEST(Optimizer, AdamWWithWeightDecayMatchesTorch) {
  run_case("adamw_wd");
}
TEST(Optimizer, SgdWithMomentumMatchesTorch) {
  run_case("sgd_momentum");
}
TEST(Optimizer, PlainSgdMatchesTorch) {
  run_case("sgd_plain");
}

TEST(Optimizer, PagedAdamWIsAdamWOnTheCpu) {
  OptimizerConfig a;
  a.weight_decay = 0.05;
  OptimizerConfig b = a;
  b.kind = OptimizerKind::paged_adamw;
  EXPECT_EQ(optimizer_state_bytes(a, 1000), optimizer_state_bytes(b, 1000));
  std::vector<float> pa = testing::randn(1000, 1), pb = pa;
  Optimizer oa(a, 1000), ob(b, 1000);
  for (unsigned s = 0; s < 3; ++s) {
    const auto g = testing::randn(1000, 10 + s);
    oa.step(pa.data(), g.data(), 1e-3);
    ob.step(pb.data(), g.data(), 1e-3);
  }
  EXPECT_EQ(pa, pb);
  EXPECT_NE(pa, testing::randn(1000, 1));
}

TEST(Optimizer, StateBytes) {
  OptimizerConfig c;
  EXPECT_GE(optimizer_state_bytes(c, 1000), 2 * 1000 * sizeof(float));
  EXPECT_LT(optimizer_state_bytes(c, 1000), 2 * 1000 * sizeof(float) + 2 * Arena::kAlign);
  c.kind = OptimizerKind::sgd;
  EXPECT_EQ(optimizer_state_bytes(c, 1000), 0u);
  c.momentum = 0.9;
  EXPECT_GE(optimizer_state_bytes(c, 1000), 1000 * sizeof(float));
  EXPECT_LT(optimizer_state_bytes(c, 1000), 1000 * sizeof(float) + Arena::kAlign);
  Optimizer o(c, 1000);
  ASSERT_EQ(o.state().size(), 1u);
  EXPECT_EQ(o.state()[0].name, "momentum_buffer");
  EXPECT_EQ(o.state()[0].n, 1000u);
}

TEST(Optimizer, ParseKind) {
  EXPECT_EQ(parse_optimizer_kind("adamw"), OptimizerKind::adamw);
  EXPECT_EQ(parse_optimizer_kind("paged_adamw"), OptimizerKind::paged_adamw);
  EXPECT_EQ(parse_optimizer_kind("sgd"), OptimizerKind::sgd);
  for (auto k : {OptimizerKind::adamw, OptimizerKind::paged_adamw, OptimizerKind::sgd})
    EXPECT_EQ(parse_optimizer_kind(optimizer_kind_name(k)), k);
  const std::string e = testing::error_of([] { parse_optimizer_kind("adam"); });
  EXPECT_NE(e.find("\"adam\""), std::string::npos) << e;
  EXPECT_NE(e.find("adamw, paged_adamw, sgd"), std::string::npos) << e;
}

TEST(Optimizer, RejectsBadHyperParameters) {
  OptimizerConfig c;
  c.beta2 = 1.0;
  EXPECT_NE(testing::error_of([&] { Optimizer o(c, 4); }).find("beta2"), std::string::npos);
  c = OptimizerConfig{};
  c.weight_decay = -1;
  EXPECT_NE(testing::error_of([&] { Optimizer o(c, 4); }).find("weight_decay"), std::string::npos);
}

// Resuming = a fresh optimizer whose state arrays and step count are copied
// from the old one: the next steps are then bit-identical to never stopping.
TEST(Optimizer, StateRoundTripContinuesBitIdentically) {
  for (auto kind : {OptimizerKind::adamw, OptimizerKind::sgd}) {
    OptimizerConfig c;
    c.kind = kind;
    c.momentum = 0.9;
    c.weight_decay = 0.01;
    const size_t n = 777;
    std::vector<float> p = testing::randn(int64_t(n), 3);
    Optimizer a(c, n);
    for (unsigned s = 0; s < 3; ++s) a.step(p.data(), testing::randn(int64_t(n), 20 + s).data(), 1e-2);
    std::vector<float> q = p;
    Optimizer b(c, n);
    const auto sa = a.state(), sb = b.state();
    ASSERT_EQ(sa.size(), sb.size());
    for (size_t i = 0; i < sa.size(); ++i) {
      ASSERT_EQ(sa[i].name, sb[i].name);
      ASSERT_EQ(sa[i].n, sb[i].n);
      std::copy_n(sa[i].data, sa[i].n, sb[i].data);
    }
    b.set_steps(a.steps());
    for (unsigned s = 3; s < 6; ++s) {
      const auto g = testing::randn(int64_t(n), 20 + s);
      a.step(p.data(), g.data(), 1e-2);
      b.step(q.data(), g.data(), 1e-2);
    }
    EXPECT_EQ(p, q) << optimizer_kind_name(kind);
    EXPECT_EQ(b.steps(), 6);
    // Without the step count the bias correction (AdamW) or the first-step
    // buffer initialisation (SGD) differs: the restore of steps matters.
    Optimizer fresh(c, n);
    const auto sf = fresh.state();
    for (size_t i = 0; i < sa.size(); ++i) std::copy_n(a.state()[i].data, sa[i].n, sf[i].data);
    std::vector<float> r = p, p2 = p;
    const auto g = testing::randn(int64_t(n), 99);
    fresh.step(r.data(), g.data(), 1e-2);
    a.step(p2.data(), g.data(), 1e-2);
    EXPECT_NE(r, p2) << optimizer_kind_name(kind);
  }
}

TEST(Optimizer, ZeroPaddingStaysZero) {
  // LoraWeights::flat_params has zero padding between tensors with zero
  // gradients; no optimizer may move it.
  for (auto kind : {OptimizerKind::adamw, OptimizerKind::sgd}) {
    OptimizerConfig c;
    c.kind = kind;
    c.weight_decay = 0.1;
    c.momentum = 0.9;
    std::vector<float> p(64, 0.0f), g(64, 0.0f);
    Optimizer o(c, 64);
    for (int s = 0; s < 3; ++s) o.step(p.data(), g.data(), 0.5);
    for (float x : p) EXPECT_EQ(x, 0.0f);
  }
}

TEST(ClipGradNorm, NormIsTheL2Norm) {
  const auto g = testing::randn(100003, 5, 0.3f);
  long double s = 0;
  for (float x : g) s += static_cast<long double>(x) * x;
  EXPECT_NEAR(grad_norm(g.data(), g.size()), std::sqrt(double(s)), 1e-12 * std::sqrt(double(s)));
  const std::vector<float> v{3.0f, 4.0f};
  EXPECT_EQ(grad_norm(v.data(), 2), 5.0);
  EXPECT_EQ(grad_norm(v.data(), 0), 0.0);
}

TEST(ClipGradNorm, ScalesByTorchsCoefficient) {
  auto g = testing::randn(100003, 6, 0.3f);
  const auto orig = g;
  const double before = grad_norm(g.data(), g.size());
  const double max_norm = before / 4;
  EXPECT_EQ(clip_grad_norm(g.data(), g.size(), max_norm), before);
  // Every element times the same fp32 coefficient max_norm / (norm + 1e-6).
  const float coef = float(max_norm / (before + 1e-6));
  for (size_t i = 0; i < g.size(); ++i) ASSERT_EQ(g[i], orig[i] * coef) << i;
  EXPECT_NEAR(grad_norm(g.data(), g.size()), max_norm, 1e-5 * max_norm);
}

TEST(ClipGradNorm, LeavesSmallGradientsAlone) {
  auto g = testing::randn(1000, 7, 0.01f);
  const auto orig = g;
  const double norm = grad_norm(g.data(), g.size());
  EXPECT_EQ(clip_grad_norm(g.data(), g.size(), norm * 2), norm);
  EXPECT_EQ(g, orig);
  // The clamp is on the coefficient: norm == max_norm still scales by
  // max_norm / (norm + 1e-6) < 1, as torch does.
  clip_grad_norm(g.data(), g.size(), norm);
  EXPECT_EQ(g[0], orig[0] * float(norm / (norm + 1e-6)));
  // max_norm <= 0: no clipping.
  g = orig;
  EXPECT_EQ(clip_grad_norm(g.data(), g.size(), 0.0), norm);
  EXPECT_EQ(g, orig);
}

}  // namespace
}  // namespace qlora
