// device.backend: what `auto`, `cpu` and `cuda` choose when the GPU is usable
// and when it is not, and what `qlora run` does on this machine.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "cuda_testing.h"
#include "testing.h"
#include "train/backend.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing::CliResult;
using testing::error_of;
using testing::ScratchDir;

const std::optional<std::string> kUsable;
const std::optional<std::string> kNoGpu = std::string("no CUDA device found (test)");

TEST(Backend, CpuIsAlwaysTheCpu) {
  for (const auto& why : {kUsable, kNoGpu}) {
    const BackendChoice c = choose_backend("cpu", why);
    EXPECT_EQ(c.backend, PlanBackend::cpu);
    EXPECT_TRUE(c.warning.empty());
  }
}

TEST(Backend, AutoTakesAUsableGpuAndOtherwiseFallsBackWithAWarning) {
  const BackendChoice gpu = choose_backend("auto", kUsable);
  EXPECT_EQ(gpu.backend, PlanBackend::cuda);
  EXPECT_TRUE(gpu.warning.empty());
  const BackendChoice cpu = choose_backend("auto", kNoGpu);
  EXPECT_EQ(cpu.backend, PlanBackend::cpu);
  EXPECT_NE(cpu.warning.find("warning: device.backend auto: no CUDA device found (test)"), std::string::npos)
      << cpu.warning;
  EXPECT_NE(cpu.warning.find("CPU"), std::string::npos) << cpu.warning;
}

TEST(Backend, CudaWithoutAUsableGpuIsAnErrorNamingTheReason) {
  EXPECT_EQ(choose_backend("cuda", kUsable).backend, PlanBackend::cuda);
  const std::string e = error_of([] { choose_backend("cuda", kNoGpu); });
  EXPECT_NE(e.find("device.backend: cuda: no CUDA device found (test)"), std::string::npos) << e;
  EXPECT_NE(e.find("device.backend: cpu"), std::string::npos) << "says what to do: " << e;
  EXPECT_NE(error_of([] { choose_backend("gpu", kUsable); }).find("expected one of auto, cpu, cuda"),
            std::string::npos);
}

// On a machine where CUDA training cannot run (every CI machine, and any
// machine until the CUDA training loop lands): the CLI refuses `cuda` before
// touching the output folder, and `auto` trains on the CPU with the warning.
TEST(Backend, QloraRunOnThisMachine) {
  const auto why = cuda_training_unavailable();
  if (!why) GTEST_SKIP() << "this machine can train on its GPU";
  ScratchDir d;
  const std::string recipe = std::string(QLORA_SOURCE_DIR) + "/recipes/demo.yaml";
  const std::string common = " train.max_steps=1 --no-samples";
  const CliResult refused =
      testing::run_qlora("run " + recipe + " output.dir=" + (d / "cuda").string() + " device.backend=cuda" + common);
  EXPECT_NE(refused.status, 0);
  EXPECT_NE(refused.output.find("device.backend: cuda: " + *why), std::string::npos) << refused.output;
  EXPECT_FALSE(fs::exists(d / "cuda" / "recipe.yaml"));

  const CliResult fallback =
      testing::run_qlora("run " + recipe + " output.dir=" + (d / "auto").string() + " device.backend=auto" + common);
  EXPECT_EQ(fallback.status, 0) << fallback.output;
  EXPECT_NE(fallback.output.find("warning: device.backend auto: " + *why), std::string::npos) << fallback.output;
  EXPECT_TRUE(fs::exists(d / "auto" / "adapter" / "adapter_model.safetensors"));
}

// Out of device memory is a sentence with sizes and what to change, not a raw
// CUDA error code, and it leaves the device usable.
TEST(Backend, OutOfGpuMemoryIsAClearErrorAndNotSticky) {
  QLORA_REQUIRE_GPU();
#if QLORA_HAVE_CUDA
  const size_t total = cuda_device_info().total_bytes;
  const std::string e = error_of([&] { DeviceBuffer<uint8_t> too_big(2 * total); });
  EXPECT_NE(e.find("out of GPU memory: could not allocate " + std::to_string((2 * total + (1u << 20) - 1) >> 20) +
                   " MiB"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("MiB free of " + std::to_string((total + (1u << 20) - 1) >> 20) + " MiB"), std::string::npos)
      << e;
  EXPECT_NE(e.find("train.micro_batch"), std::string::npos) << e;
  DeviceBuffer<float> small(1024);
  std::vector<float> host(1024, 1.5f), back(1024);
  small.upload(host.data(), host.size());
  small.download(back.data(), back.size());
  EXPECT_EQ(back, host);
#endif
}

}  // namespace
}  // namespace qlora
