#!/usr/bin/env bash
# The interop suite (tests/interop, docs/interop.md): qlora's formats proven against the real
# libraries from PyPI (transformers, PEFT, bitsandbytes, tokenizers, Jinja2, llama.cpp), on the CPU.
# Sets up build/interop-venv (scripts/interop-venv.sh; reused while the pinned requirements are
# unchanged), then runs pytest with the qlora binary $QLORA_BIN (default build/qlora).
# Extra arguments go to pytest (e.g. -k peft). Fixtures: ../shared/fixtures or $QLORA_FIXTURES.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export QLORA_BIN="${QLORA_BIN:-$root/build/qlora}"
if [[ ! -x "$QLORA_BIN" ]]; then
    echo "interop: qlora binary $QLORA_BIN not found (build first: scripts/build.sh)" >&2
    exit 1
fi
scripts/interop-venv.sh
scripts/peer-fixtures.sh
venv="${QLORA_INTEROP_VENV:-$root/build/interop-venv}"
start=$(date +%s)
set +e
"$venv/bin/python" -m pytest tests/interop -v -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
echo "interop: suite ran in $(( $(date +%s) - start )) s (exit $rc)"
exit $rc
