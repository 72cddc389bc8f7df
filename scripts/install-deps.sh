#!/usr/bin/env bash
# Installs the Debian packages qlora builds and tests with. Idempotent and
# non-interactive: packages already present are skipped, apt runs only when
# something is missing. CUDA is optional and never installed here: when nvcc
# is on PATH (or in /usr/local/cuda/bin) the build compiles the CUDA sources.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libyaml-cpp-dev libcli11-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev
  libopenblas-dev
  libpcre2-dev libsentencepiece-dev libicu-dev
  libcpp-httplib-dev
  curl
  clang-format
  clang libclang-rt-dev libomp-dev  # the sanitizer and fuzzing build (scripts/sanitize.sh, scripts/fuzz.sh)
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
