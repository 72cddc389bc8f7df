// Which device trains: device.backend (auto | cpu | cuda) against what this
// build and this machine have. `cuda` that cannot run is an error naming the
// reason; `auto` falls back to the CPU with a warning, never silently and
// never with a raw CUDA error code.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "plan/plan.h"

namespace qlora {

struct BackendChoice {
  PlanBackend backend = PlanBackend::cpu;
  std::string warning;  // non-empty when `auto` fell back to the CPU
};

// nullopt when this build has the CUDA backend and device 0 can run it;
// otherwise why not ("this build has no CUDA backend ...", "no CUDA device
// found (...)", "the NVIDIA driver is too old ...", ...).
std::optional<std::string> cuda_backend_unavailable();

// Why `qlora run` cannot train on the GPU (today: cuda_backend_unavailable()).
std::optional<std::string> cuda_training_unavailable();

// setting: "auto", "cpu" or "cuda" (the recipe's device.backend). `why_not`
// is cuda_backend_unavailable()'s answer (a parameter so tests can pass one).
// Throws qlora::Error for cuda when why_not is set.
BackendChoice choose_backend(std::string_view setting, const std::optional<std::string>& why_not);

}  // namespace qlora
