#!/usr/bin/env bash
# Configures and builds qlora into build/ (Release). CUDA sources compile when
# nvcc is found (QLORA_CUDA=AUTO); pass extra CMake flags as arguments, e.g.
#   scripts/build.sh -DQLORA_CUDA=OFF
# With CI=true, compiler warnings are errors.
set -euo pipefail
cd "$(dirname "$0")/.."
werror=OFF
if [ "${CI:-}" = "true" ]; then werror=ON; fi
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
if [ -f build/CMakeCache.txt ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${generator[1]:-Unix Makefiles}" build/CMakeCache.txt; then
  rm -rf build  # a cache made by another generator cannot be reused
fi
cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DQLORA_WERROR="$werror" "$@"
cmake --build build -j "$(nproc)"
