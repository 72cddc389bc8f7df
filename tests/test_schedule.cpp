// Learning-rate schedules against their closed forms (transformers'
// get_*_schedule_with_warmup), evaluated here independently at the key points.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "testing.h"
#include "train/schedule.h"

namespace qlora {
namespace {

constexpr double kPi = 3.14159265358979323846;

ScheduleConfig make(ScheduleKind k, double lr, int64_t warmup, int64_t total, double min_ratio = 0.0) {
  ScheduleConfig c;
  c.kind = k;
  c.lr = lr;
  c.warmup_steps = warmup;
  c.total_steps = total;
  c.min_lr_ratio = min_ratio;
  return c;
}

TEST(Schedule, WarmupIsLinearFromZero) {
  for (auto k : {ScheduleKind::constant, ScheduleKind::linear, ScheduleKind::cosine}) {
    const auto c = make(k, 1e-3, 10, 100);
    EXPECT_EQ(lr_at(c, 0), 0.0) << schedule_kind_name(k);  // transformers: lambda(0) = 0 / W
    EXPECT_DOUBLE_EQ(lr_at(c, 1), 1e-3 * 1 / 10);
    EXPECT_DOUBLE_EQ(lr_at(c, 5), 1e-3 * 5 / 10);
    EXPECT_DOUBLE_EQ(lr_at(c, 9), 1e-3 * 9 / 10);
    EXPECT_DOUBLE_EQ(lr_at(c, 10), 1e-3);  // end of warmup: the peak
  }
}

TEST(Schedule, Constant) {
  const auto c = make(ScheduleKind::constant, 3e-4, 0, 50, 0.5);  // min_lr_ratio has no effect
  for (int64_t s : {0, 1, 25, 49, 50, 80}) EXPECT_EQ(lr_at(c, s), 3e-4) << s;
}

TEST(Schedule, Linear) {
  const double lr = 2e-4;
  const int64_t W = 10, T = 110;
  const auto c = make(ScheduleKind::linear, lr, W, T);
  EXPECT_DOUBLE_EQ(lr_at(c, W), lr);
  EXPECT_DOUBLE_EQ(lr_at(c, 60), lr * 0.5);             // half way through the decay
  EXPECT_DOUBLE_EQ(lr_at(c, T - 1), lr * 1.0 / 100.0);  // the last step
  EXPECT_EQ(lr_at(c, T), 0.0);
  EXPECT_EQ(lr_at(c, T + 5), 0.0);
  // With a floor: lr * (m + (1 - m) * remaining).
  const auto f = make(ScheduleKind::linear, lr, W, T, 0.1);
  EXPECT_DOUBLE_EQ(lr_at(f, 60), lr * (0.1 + 0.9 * 0.5));
  EXPECT_DOUBLE_EQ(lr_at(f, T), lr * 0.1);
  EXPECT_DOUBLE_EQ(lr_at(f, T + 5), lr * 0.1);
}

TEST(Schedule, Cosine) {
  const double lr = 1e-3;
  const int64_t W = 20, T = 220;
  const auto c = make(ScheduleKind::cosine, lr, W, T);
  EXPECT_DOUBLE_EQ(lr_at(c, W), lr);
  EXPECT_NEAR(lr_at(c, 120), lr * 0.5, 1e-18);  // cos(pi/2) = 0
  EXPECT_DOUBLE_EQ(lr_at(c, 70), lr * 0.5 * (1 + std::cos(kPi * 0.25)));
  EXPECT_DOUBLE_EQ(lr_at(c, T - 1), lr * 0.5 * (1 + std::cos(kPi * 199.0 / 200.0)));
  EXPECT_EQ(lr_at(c, T), 0.0);
  EXPECT_EQ(lr_at(c, T + 50), 0.0);  // held, not turning back up
  // transformers' get_cosine_with_min_lr_schedule_with_warmup: f * (1 - m) + m.
  const auto f = make(ScheduleKind::cosine, lr, W, T, 0.1);
  EXPECT_DOUBLE_EQ(lr_at(f, W), lr);
  EXPECT_DOUBLE_EQ(lr_at(f, 120), lr * (0.5 * 0.9 + 0.1));
  EXPECT_DOUBLE_EQ(lr_at(f, T), lr * 0.1);
  // Monotone non-increasing after warmup.
  for (int64_t s = W; s < T + 2; ++s) EXPECT_LE(lr_at(f, s + 1), lr_at(f, s)) << s;
}

TEST(Schedule, NoWarmupStartsAtThePeak) {
  EXPECT_EQ(lr_at(make(ScheduleKind::cosine, 5e-5, 0, 10), 0), 5e-5);
  EXPECT_EQ(lr_at(make(ScheduleKind::linear, 5e-5, 0, 10), 0), 5e-5);
  // One step in all: the only step runs at the peak.
  EXPECT_EQ(lr_at(make(ScheduleKind::cosine, 5e-5, 0, 1), 0), 5e-5);
}

TEST(Schedule, WarmupLongerThanTheRun) {
  const auto c = make(ScheduleKind::linear, 1e-3, 50, 10);
  EXPECT_DOUBLE_EQ(lr_at(c, 9), 1e-3 * 9 / 50);
}

TEST(Schedule, WarmupStepsFrom) {
  EXPECT_EQ(warmup_steps_from(0.0, 1000), 0);
  EXPECT_EQ(warmup_steps_from(0.03, 1000), 30);
  EXPECT_EQ(warmup_steps_from(0.03, 1001), 31);  // ceil(30.03)
  EXPECT_EQ(warmup_steps_from(0.1, 7), 1);       // ceil(0.7)
  EXPECT_EQ(warmup_steps_from(0.5, 3), 2);       // ceil(1.5)
  EXPECT_EQ(warmup_steps_from(1.0, 1000), 1);
  EXPECT_EQ(warmup_steps_from(100.0, 50), 100);
  EXPECT_NE(testing::error_of([] { warmup_steps_from(-0.1, 10); }).find("warmup"), std::string::npos);
  EXPECT_NE(testing::error_of([] { warmup_steps_from(2.5, 10); }).find("whole number"), std::string::npos);
}

TEST(Schedule, ParseAndCheck) {
  for (auto k : {ScheduleKind::constant, ScheduleKind::linear, ScheduleKind::cosine})
    EXPECT_EQ(parse_schedule_kind(schedule_kind_name(k)), k);
  const std::string e = testing::error_of([] { parse_schedule_kind("cosine_with_restarts"); });
  EXPECT_NE(e.find("\"cosine_with_restarts\""), std::string::npos) << e;
  EXPECT_NE(e.find("constant, linear, cosine"), std::string::npos) << e;
  EXPECT_NE(testing::error_of([] { lr_at(make(ScheduleKind::linear, 1e-3, 0, 0), 0); }).find("total_steps"),
            std::string::npos);
  EXPECT_NE(
      testing::error_of([] { lr_at(make(ScheduleKind::linear, 1e-3, 0, 10, 1.5), 0); }).find("min_lr_ratio"),
      std::string::npos);
  EXPECT_NE(testing::error_of([] { lr_at(make(ScheduleKind::linear, 1e-3, 0, 10), -1); }).find("step"),
            std::string::npos);
}

}  // namespace
}  // namespace qlora
