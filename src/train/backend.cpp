#include "train/backend.h"

#include "core/error.h"

#if QLORA_HAVE_CUDA
#include "kernels/cuda/device.h"
#endif

namespace qlora {

std::optional<std::string> cuda_backend_unavailable() {
#if QLORA_HAVE_CUDA
  return cuda_unavailable_reason();
#else
  return std::string("this build has no CUDA backend (nvcc was not found when it was configured)");
#endif
}

std::optional<std::string> cuda_training_unavailable() { return cuda_backend_unavailable(); }

BackendChoice choose_backend(std::string_view setting, const std::optional<std::string>& why_not) {
  BackendChoice c;
  if (setting == "cpu") return c;
  if (setting != "cuda" && setting != "auto")
    fail("device.backend: expected one of auto, cpu, cuda, got '", setting, "'");
  if (!why_not) {
    c.backend = PlanBackend::cuda;
    return c;
  }
  if (setting == "cuda")
    fail("device.backend: cuda: ", *why_not, "; set device.backend: cpu (or auto) to train on the CPU");
  c.warning = str("warning: device.backend auto: ", *why_not,
                  "; training on the CPU reference backend (much slower than a GPU for real models)");
  return c;
}

}  // namespace qlora
