# The GPU bundle (scripts/gpu-bundle.sh, docs/gpu.md), packed from this very build (no second CUDA
# build) and run here without a GPU. Included by tests/CMakeLists.txt when the CUDA backend is built.
#   GpuBundle.Make              packs bin/, lib/ and src/ (no wheel, no archive: no network, no xz time)
#   GpuBundle.EmptyEnvironment  the binaries start with env -i and only the bundle's library folder
#   GpuBundle.TestsSkipWithoutGpu  the test binary reads the bundle's data; its GPU suites skip
#   GpuBundle.HoldsEveryLibrary every library ldd reports is bundled or expected on the GPU machine
#   GpuBundle.CheckDryRun       scripts/gpu-check.sh --dry-run from the bundle: every stage, GPU hidden
set(QLORA_GPU_BUNDLE_TEST_DIR ${CMAKE_BINARY_DIR}/gpu-bundle-test)
set(_check ${CMAKE_CURRENT_LIST_DIR}/check_bundle.sh)
add_test(NAME GpuBundle.Make
  COMMAND bash ${PROJECT_SOURCE_DIR}/scripts/gpu-bundle.sh --build-dir ${CMAKE_BINARY_DIR} --no-build
          --no-wheel --no-archive --out ${QLORA_GPU_BUNDLE_TEST_DIR})
set_tests_properties(GpuBundle.Make PROPERTIES FIXTURES_SETUP qlora_gpu_bundle TIMEOUT 300)
add_test(NAME GpuBundle.EmptyEnvironment COMMAND bash ${_check} empty-env ${QLORA_GPU_BUNDLE_TEST_DIR})
add_test(NAME GpuBundle.TestsSkipWithoutGpu COMMAND bash ${_check} skips ${QLORA_GPU_BUNDLE_TEST_DIR})
add_test(NAME GpuBundle.HoldsEveryLibrary COMMAND bash ${_check} libs ${QLORA_GPU_BUNDLE_TEST_DIR})
add_test(NAME GpuBundle.CheckDryRun
  COMMAND bash ${QLORA_GPU_BUNDLE_TEST_DIR}/gpu-check.sh ${CMAKE_BINARY_DIR}/gpu-check-dry-run --dry-run)
set_tests_properties(GpuBundle.EmptyEnvironment GpuBundle.TestsSkipWithoutGpu GpuBundle.HoldsEveryLibrary
  GpuBundle.CheckDryRun PROPERTIES FIXTURES_REQUIRED qlora_gpu_bundle TIMEOUT 600)
