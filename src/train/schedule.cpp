#include "train/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace qlora {

ScheduleKind parse_schedule_kind(std::string_view name) {
  if (name == "constant") return ScheduleKind::constant;
  if (name == "linear") return ScheduleKind::linear;
  if (name == "cosine") return ScheduleKind::cosine;
  fail("unknown lr schedule \"", name, "\", expected one of: constant, linear, cosine");
}

const char* schedule_kind_name(ScheduleKind k) {
  switch (k) {
    case ScheduleKind::constant:
      return "constant";
    case ScheduleKind::linear:
      return "linear";
    case ScheduleKind::cosine:
      return "cosine";
  }
  return "?";
}

void check_schedule(const ScheduleConfig& c) {
  if (!(c.lr >= 0.0) || !std::isfinite(c.lr)) fail("lr schedule: lr must be a finite value >= 0, got ", c.lr);
  if (c.warmup_steps < 0) fail("lr schedule: warmup_steps must be >= 0, got ", c.warmup_steps);
  if (c.total_steps < 1) fail("lr schedule: total_steps must be >= 1, got ", c.total_steps);
  if (!(c.min_lr_ratio >= 0.0 && c.min_lr_ratio <= 1.0))
    fail("lr schedule: min_lr_ratio must be in [0, 1], got ", c.min_lr_ratio);
}

double lr_at(const ScheduleConfig& c, int64_t step) {
  check_schedule(c);
  if (step < 0) fail("lr schedule: step must be >= 0, got ", step);
  const int64_t W = c.warmup_steps, T = c.total_steps;
  if (step < W) return c.lr * (double(step) / double(std::max<int64_t>(1, W)));
  const double m = c.min_lr_ratio;
  const double span = double(std::max<int64_t>(1, T - W));
  const int64_t s = std::min(step, T);  // past the end: hold the end value
  switch (c.kind) {
    case ScheduleKind::constant:
      return c.lr;
    case ScheduleKind::linear: {
      const double f = std::max(0.0, double(T - s) / span);
      return c.lr * (m + (1.0 - m) * f);
    }
    case ScheduleKind::cosine: {
      const double progress = double(s - W) / span;
      const double f = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
      return c.lr * std::max(0.0, m + (1.0 - m) * f);
    }
  }
  return c.lr;
}

int64_t warmup_steps_from(double warmup, int64_t total_steps) {
  if (!(warmup >= 0.0) || !std::isfinite(warmup))
    fail("warmup must be >= 0 (a ratio of the total steps below 1, else a step count), got ", warmup);
  if (warmup < 1.0) return int64_t(std::ceil(warmup * double(total_steps)));
  if (warmup != std::floor(warmup))
    fail("warmup ", warmup, " is >= 1, so it is a step count and must be a whole number (a ratio is < 1)");
  return int64_t(warmup);
}

}  // namespace qlora
