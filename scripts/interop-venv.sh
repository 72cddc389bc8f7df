#!/usr/bin/env bash
# Creates (or reuses) the virtual environment of the interop suite, build/interop-venv, from the
# pinned tests/interop/requirements.txt. The environment is reused while the requirements file, this
# script and the Python version are unchanged (their hash is stored in the venv); otherwise it is
# rebuilt from scratch. Prints how long it took. Uses the python3 on PATH (3.11).
#
# Everything comes from PyPI. torch is PyPI's Linux wheel (it pulls NVIDIA's CUDA runtime wheels,
# ~2.5 GB; the CPU-only index is not reachable here). llama-cpp-python compiles llama.cpp from its
# sdist: a portable CPU build (no -march=native, no GPU backends), with the machine's cores.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${QLORA_INTEROP_VENV:-$root/build/interop-venv}"
req="$root/tests/interop/requirements.txt"
py="${PYTHON:-python3}"
start=$(date +%s)

key=$( { cat "$req" "$0"; "$py" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
if [[ -x "$venv/bin/python" && -f "$venv/.requirements.sha256" && "$(cat "$venv/.requirements.sha256")" == "$key" ]]; then
    echo "interop venv: reusing $venv (requirements unchanged, $key)"
    exit 0
fi

echo "interop venv: building $venv from $req"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_CCACHE=OFF -DLLAVA_BUILD=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
t0=$(date +%s)
# Binary wheels first (everything but llama-cpp-python), then the source build, each timed.
grep -v -i '^llama-cpp-python' "$req" > "$venv/.requirements-wheels.txt"
"$venv/bin/python" -m pip install --quiet --only-binary=:all: -r "$venv/.requirements-wheels.txt"
t1=$(date +%s)
echo "interop venv: wheels installed in $((t1 - t0)) s"
"$venv/bin/python" -m pip install --quiet -r "$req"
t2=$(date +%s)
echo "interop venv: llama-cpp-python built and installed in $((t2 - t1)) s"
"$venv/bin/python" -m pip freeze > "$venv/.freeze.txt"
echo "$key" > "$venv/.requirements.sha256"
echo "interop venv: ready in $(( $(date +%s) - start )) s ($venv, $(du -sh "$venv" | cut -f1))"
