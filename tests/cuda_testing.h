// QLORA_REQUIRE_GPU(): skips a CUDA test with the reason when this build has
// no CUDA backend or the machine has no usable GPU (the CUDA parity suites).
#pragma once

#include <gtest/gtest.h>

#if QLORA_HAVE_CUDA
#include "kernels/cuda/device.h"
#define QLORA_REQUIRE_GPU()                                           \
  do {                                                                \
    if (const auto qlora_no_gpu = ::qlora::cuda_unavailable_reason()) \
      GTEST_SKIP() << "no GPU: " << *qlora_no_gpu;                    \
  } while (0)
#else
#define QLORA_REQUIRE_GPU() GTEST_SKIP() << "built without CUDA (nvcc not found at configure time)"
#endif
