#!/usr/bin/env bash
# One command from a fresh Debian machine to the main job on the built-in
# demo: installs the dependencies, builds, then quantizes the built-in tiny
# Llama to NF4 (bitsandbytes 4-bit layout) and inspects the result.
# (`qlora run` on a demo recipe takes over once the trainer lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
out=runs/demo/tiny-nf4
./build/qlora quantize builtin:tiny -o "$out" --force
./build/qlora inspect "$out"
