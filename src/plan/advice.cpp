// Advice from the plan: the largest micro-batch and the longest seq_len that
// fit the budget (both monotone in the device bytes, so a doubling search then
// a bisection), and what each switch would save, each computed by planning
// the changed input (no separate formula).
#include <algorithm>

#include "core/error.h"
#include "plan/plan.h"

namespace qlora {

namespace {

bool fits(const PlanInput& in) {
  const Verdict v = make_plan(in).verdict;
  return v == Verdict::fits || v == Verdict::fits_with_paging;
}

// The largest x in [lo, hi] with ok(x), given ok is monotone (true then
// false); lo - 1 when even ok(lo) is false.
template <typename F>
int64_t largest(int64_t lo, int64_t hi, F ok) {
  if (!ok(lo)) return lo - 1;
  int64_t good = lo, step = 1;
  // Doubling first: large bounds (131072 positions) are rarely the answer.
  while (good < hi) {
    const int64_t next = std::min(hi, good + step);
    if (!ok(next)) {
      hi = next - 1;
      break;
    }
    good = next;
    step *= 2;
  }
  while (good < hi) {
    const int64_t mid = good + (hi - good + 1) / 2;
    if (ok(mid)) {
      good = mid;
    } else {
      hi = mid - 1;
    }
  }
  return good;
}

std::string targets_text(const LoraConfig& lc) {
  std::string s;
  for (int t = 0; t < kNumLoraTargets; ++t)
    if (lc.targets[size_t(t)]) s += str(s.empty() ? "" : ",", lora_target_module(LoraTarget(t)));
  return "[" + s + "]";
}

}  // namespace

PlanAdvice make_advice(const PlanInput& in) {
  PlanAdvice a;
  const MemoryPlan base = make_plan(in);
  const bool budget = in.budget_bytes > 0;
  if (budget) {
    a.max_micro_batch = largest(1, kAdviceMaxMicroBatch, [&](int64_t b) {
      PlanInput x = in;
      x.micro_batch = b;
      return fits(x);
    });
    const int64_t t = largest(2, max_seq_len(in), [&](int64_t t_try) {
      PlanInput x = in;
      x.seq_len = t_try;
      return fits(x);
    });
    a.max_seq_len = t >= 2 ? t : 0;
  }
  auto consider = [&](std::string name, std::string change, const PlanInput& x) {
    const MemoryPlan p = make_plan(x);
    a.switches.push_back({std::move(name), std::move(change),
                          int64_t(base.device_bytes) - int64_t(p.device_bytes),
                          p.verdict == Verdict::fits || p.verdict == Verdict::fits_with_paging});
  };
  // With train.checkpointing: auto the plan has already chosen.
  if (!in.checkpointing_auto) {
    PlanInput x = in;
    x.checkpointing = !in.checkpointing;
    consider("checkpointing",
             in.checkpointing ? "train.checkpointing: true -> false" : "train.checkpointing: false -> true",
             x);
  }
  if (in.backend == PlanBackend::cuda && in.optimizer.kind == OptimizerKind::adamw) {
    PlanInput x = in;
    x.optimizer.kind = OptimizerKind::paged_adamw;
    consider("paged optimizer", "train.optimizer: adamw -> paged_adamw", x);
  }
  if (in.lora.rank > 1) {
    PlanInput x = in;
    x.lora.rank = in.lora.rank / 2;
    consider("lower rank", str("lora.rank: ", in.lora.rank, " -> ", x.lora.rank), x);
  }
  {
    // Attention only, then q and v only (the original LoRA paper's choice).
    LoraConfig fewer = in.lora;
    for (LoraTarget t : {LoraTarget::Gate, LoraTarget::Up, LoraTarget::Down})
      fewer.targets[size_t(t)] = false;
    if (fewer.targets == in.lora.targets)
      for (LoraTarget t : {LoraTarget::K, LoraTarget::O}) fewer.targets[size_t(t)] = false;
    bool any = false;
    for (bool t : fewer.targets) any = any || t;
    if (any && fewer.targets != in.lora.targets) {
      PlanInput x = in;
      x.lora = fewer;
      consider("fewer targets", str("lora.targets: ", targets_text(in.lora), " -> ", targets_text(fewer)), x);
    }
  }
  if (in.seq_len >= 4) {
    PlanInput x = in;
    x.seq_len = in.seq_len / 2;
    consider("shorter sequences", str("data.seq_len: ", in.seq_len, " -> ", x.seq_len), x);
  }
  if (in.micro_batch > 1) {
    PlanInput x = in;
    x.micro_batch = 1;
    consider("smaller micro-batch",
             str("train.micro_batch: ", in.micro_batch, " -> 1 (train.grad_accum x", in.micro_batch, ")"), x);
  }
  if (in.backend == PlanBackend::cuda && !in.prequantized) {
    PlanInput x = in;
    if (!in.quantize) {
      x.quantize = true;
      consider("4-bit base", "quant.type: none -> nf4", x);
    } else if (!in.double_quant) {
      x.double_quant = true;
      consider("double quantization", "quant.double_quant: false -> true", x);
    }
  }
  return a;
}

}  // namespace qlora
