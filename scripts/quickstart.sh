#!/usr/bin/env bash
# One command from a fresh Debian machine to the main job: installs the
# dependencies, builds, then fine-tunes SmolLM2-135M-Instruct, a real trained
# instruct model (its GGUF from the test fixtures, or fetched once into the
# cache by scripts/fetch-smollm2.sh), with QLoRA on the CPU on the shipped
# legal Q&A data (recipes/smollm2-legal.yaml): its answers before and after
# training, a PEFT adapter in runs/smollm2-legal/adapter and a report in
# runs/smollm2-legal/report.html. Without the model and without network it
# runs the built-in tiny demo (recipes/demo.yaml) instead, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
# --overwrite: running the quickstart again replaces the previous demo run.
if model="$(scripts/fetch-smollm2.sh)"; then
  ./build/qlora run recipes/smollm2-legal.yaml --overwrite model.path="$model" "$@"
else
  echo "quickstart: SmolLM2-135M-Instruct is neither in the fixtures nor in the cache, and fetching it failed;" \
    "running the built-in tiny demo (recipes/demo.yaml, a random model) instead" >&2
  ./build/qlora run recipes/demo.yaml --overwrite "$@"
fi
