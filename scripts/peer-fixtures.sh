#!/usr/bin/env bash
# Test data that the peer libraries publish on PyPI, unpacked into build/peer-fixtures/ (or
# $QLORA_PEER_FIXTURES) with the layout of ../shared/fixtures. Tests look there after the shared
# fixtures (tests/testing.h peer_fixture, tests/interop/conftest.py need_fixture) and skip with a
# message naming this script when a file is absent.
#
# Source: the sdist of llama-cpp-python 0.3.36 (the version tests/interop/requirements.txt pins),
# which vendors llama.cpp's models/ folder: the Qwen3 chat template as llama.cpp copied it from
# Qwen/Qwen3-0.6B's tokenizer_config.json, and the Qwen2 vocabulary as a vocab-only GGUF with
# llama.cpp's tokenizer test strings and the ids Hugging Face tokenizers gives them (.inp/.out).
# The archive is checked against its sha256 before anything is unpacked; files are data, never run.
# Idempotent: does nothing when every file is present. Offline, it says so and exits 0 (the tests
# that need these files skip).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${QLORA_PEER_FIXTURES:-$root/build/peer-fixtures}"

version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
url="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$version.tar.gz"
# archive member (under llama_cpp_python-$version/vendor/llama.cpp/models/) -> destination
files=(
  "templates/Qwen-Qwen3-0.6B.jinja chat_templates/Qwen-Qwen3-0.6B.jinja"
  "ggml-vocab-qwen2.gguf tokenizer_tests/llamacpp/ggml-vocab-qwen2.gguf"
  "ggml-vocab-qwen2.gguf.inp tokenizer_tests/llamacpp/ggml-vocab-qwen2.gguf.inp"
  "ggml-vocab-qwen2.gguf.out tokenizer_tests/llamacpp/ggml-vocab-qwen2.gguf.out"
)

missing=0
for f in "${files[@]}"; do [[ -f "$dest/${f#* }" ]] || missing=1; done
if [[ $missing == 0 ]]; then
  echo "peer-fixtures: present in $dest"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
archive="$tmp/llama_cpp_python-$version.tar.gz"
if ! curl -fsSL --retry 3 -o "$archive" "$url"; then
  echo "peer-fixtures: WARNING: could not download $url (offline?); the tests that need these files will skip" >&2
  exit 0
fi
echo "$sha256  $archive" | sha256sum -c --quiet - || { echo "peer-fixtures: sha256 mismatch for $url" >&2; exit 1; }

prefix="llama_cpp_python-$version/vendor/llama.cpp/models"
members=()
for f in "${files[@]}"; do members+=("$prefix/${f%% *}"); done
tar -xzf "$archive" -C "$tmp" "${members[@]}"
for f in "${files[@]}"; do
  out="$dest/${f#* }"
  mkdir -p "$(dirname "$out")"
  cp "$tmp/$prefix/${f%% *}" "$out.tmp-$$"
  mv "$out.tmp-$$" "$out"
done
echo "peer-fixtures: unpacked ${#files[@]} files from llama-cpp-python $version's sdist into $dest"
