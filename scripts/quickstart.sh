#!/usr/bin/env bash
# One command from a fresh Debian machine to the main job on the built-in
# demo: installs the dependencies, builds, then fine-tunes the built-in tiny
# Llama (NF4 base + LoRA, on the CPU) on the shipped legal Q&A data with
# recipes/demo.yaml: sample answers before and after, a PEFT adapter in
# runs/demo/adapter and a report in runs/demo/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
# --overwrite: running the quickstart again replaces the previous demo run.
./build/qlora run recipes/demo.yaml --overwrite "$@"
