#!/usr/bin/env bash
# One command from a fresh Debian machine to a passing test suite:
# installs the dependencies, builds (CUDA code too where nvcc exists) and runs
# every test. GPU tests skip with a message where no GPU is present; fixture
# tests skip where ../shared/fixtures (or $QLORA_FIXTURES) is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/peer-fixtures.sh  # test data the peer libraries publish on PyPI (skipped offline)
scripts/build.sh "$@"
cd build
ctest --output-on-failure -j "$(nproc)"
