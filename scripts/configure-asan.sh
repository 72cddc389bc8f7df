#!/usr/bin/env bash
# Configures build-asan/: clang with ASan + UBSan (-fno-sanitize-recover=all)
# and the libFuzzer targets, no CUDA, no benchmarks. Used by
# scripts/sanitize.sh and scripts/fuzz.sh; CI=true makes warnings errors.
set -euo pipefail
cd "$(dirname "$0")/.."
werror=OFF
if [ "${CI:-}" = "true" ]; then werror=ON; fi
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
# -O2 keeps the suite's training tests fast enough; line tables name the
# source lines in sanitizer reports without full debug info's build time.
cmake -S . -B build-asan "${generator[@]}" -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -gline-tables-only" \
  -DQLORA_CUDA=OFF -DQLORA_BUILD_BENCH=OFF -DQLORA_FUZZ=ON -DQLORA_WERROR="$werror" "$@" >/dev/null
