#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer, in
# build-asan/ (clang; the first finding aborts the test that hit it). The
# same instrumented build holds the libFuzzer targets (fuzz/), whose committed
# corpora CTest replays here; scripts/fuzz.sh then fuzzes them for a while.
#   scripts/sanitize.sh [ctest arguments, e.g. -R Run]
# docs/reliability.md lists what runs and how long it takes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/configure-asan.sh
cmake --build build-asan -j "$(nproc)"
cd build-asan
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
ctest --output-on-failure -j "$(nproc)" "$@"
