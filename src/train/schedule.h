// Learning-rate schedules, as transformers' get_{constant,linear,cosine}_
// schedule_with_warmup (cosine with min_lr_rate as in
// get_cosine_with_min_lr_schedule_with_warmup), so a run's lr curve and loss
// curve line up with a Hugging Face Trainer run of the same recipe:
//
//   warmup (step < W):  lr * step / max(1, W)
//   then, with progress = (step - W) / max(1, T - W):
//     constant: lr
//     linear:   lr * (m + (1 - m) * max(0, (T - step) / max(1, T - W)))
//     cosine:   lr * (m + (1 - m) * 0.5 * (1 + cos(pi * progress)))
//
// where T = total_steps, W = warmup_steps, m = min_lr_ratio. As in
// transformers, step 0 of a warmup runs at lr 0 (AdamW then only fills its
// moments), and the last step (T - 1) runs a little above the final lr.
// Steps past T hold the end value (transformers' cosine would turn back up).
#pragma once

#include <cstdint>
#include <string_view>

namespace qlora {

enum class ScheduleKind { constant, linear, cosine };
// "constant" | "linear" | "cosine"; anything else -> Error listing them.
ScheduleKind parse_schedule_kind(std::string_view name);
const char* schedule_kind_name(ScheduleKind k);

struct ScheduleConfig {
  ScheduleKind kind = ScheduleKind::cosine;
  double lr = 2e-4;           // peak learning rate
  int64_t warmup_steps = 0;   // >= 0
  int64_t total_steps = 1;    // >= 1: optimizer steps of the whole run
  double min_lr_ratio = 0.0;  // [0, 1]; linear/cosine end at lr * min_lr_ratio
};

// Throws qlora::Error naming the field for values outside the ranges above.
void check_schedule(const ScheduleConfig& c);

// The learning rate for optimizer step `step` (0-based). Checks the config.
double lr_at(const ScheduleConfig& c, int64_t step);

// The recipe's train.warmup: < 1 is a ratio of total steps, rounded up as
// transformers' TrainingArguments.get_warmup_steps does (ceil(ratio * total));
// >= 1 is a step count (must be a whole number). Negative -> Error.
int64_t warmup_steps_from(double warmup, int64_t total_steps);

}  // namespace qlora
