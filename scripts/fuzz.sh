#!/usr/bin/env bash
# Fuzzes the parsers with libFuzzer (fuzz/, docs/reliability.md):
#   scripts/fuzz.sh [--seconds N] [--parallel P] [--skip TARGET]... [--warn-only] [TARGET ...]
# Every target (or those named) runs N seconds (default 60), P targets at a
# time (default: the number of cores; each target is one process), from its
# committed corpus (fuzz/corpus/<target>/), plus the small real files of the
# fixtures where they are present (../shared/fixtures or $QLORA_FIXTURES), in
# build-asan/ (scripts/configure-asan.sh). New interesting inputs stay in
# build-asan/fuzz/work/<target>/ for the next run. A crash, hang (10 s), leak,
# sanitizer finding or allocation over 1 GiB fails the script and leaves the
# input in build-asan/fuzz/artifacts/<target>/: fix the bug, then commit that
# input as fuzz/corpus/<target>/regress-<what> (CTest replays it).
# Prints a table of executions per target.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=60
parallel=$(nproc)
targets=()
skip=" "
warn_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --parallel) parallel="$2"; shift 2 ;;
    --skip) skip+="$2 "; shift 2 ;;
    # CI: a finding of the time-boxed search is printed (with the input in
    # base64, so the CI log alone reproduces it) but does not fail the build;
    # committed regression inputs are replayed by CTest, which does.
    --warn-only) warn_only=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
# The target list is fuzz/CMakeLists.txt's QLORA_FUZZ_TARGETS.
all=$(sed -n '/^set(QLORA_FUZZ_TARGETS$/,/)/p' fuzz/CMakeLists.txt | sed 1d | tr -d ')')
if [ ${#targets[@]} -eq 0 ]; then
  for t in $all; do case "$skip" in *" $t "*) ;; *) targets+=("$t") ;; esac; done
fi
for t in "${targets[@]}"; do
  case " $(echo $all) " in *" $t "*) ;; *) echo "fuzz.sh: unknown target $t (targets: $(echo $all))" >&2; exit 2 ;; esac
done

if [ ! -f build-asan/build.ninja ] && [ ! -f build-asan/Makefile ]; then scripts/configure-asan.sh; fi
cmake --build build-asan -j "$(nproc)" --target $(printf 'fuzz_%s ' "${targets[@]}")

fixtures="${QLORA_FIXTURES:-../shared/fixtures}"
# Real files as extra seeds, never copied into the repository. Only small
# ones: libFuzzer cuts inputs to -max_len, and a cut JSON file is no seed.
fixture_seeds() {  # target -> files
  [ -d "$fixtures" ] || return 0
  local f="$fixtures"
  case "$1" in
    hf_config) ls "$f"/models/*/hf/config.json ;;
    tokenizer_json) ls "$f"/models/stories260K/hf/tokenizer.json ;;
    sentencepiece) ls "$f"/models/stories260K/tok512.model ;;
    tokenizer_config) ls "$f"/tokenizers/*/tokenizer_config.json "$f"/chat_templates/*.jinja "$f"/models/*/hf/tokenizer_config.json ;;
    gguf) ls "$f"/tokenizer_tests/llamacpp/*.gguf ;;
  esac 2>/dev/null || true
}
max_len() {
  case "$1" in
    gguf) echo 1048576 ;;
    tokenizer_json|tokenizer_config|dataset) echo 65536 ;;
    *) echo 16384 ;;
  esac
}

out=build-asan/fuzz
mkdir -p "$out"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# One target: its seeds, a timed run, a line of the table in $out/<target>.result.
fuzz_one() {
  local t="$1"
  local work="$out/work/$t" seeds="$out/seeds/$t" art="$out/artifacts/$t/" log="$out/$t.log"
  mkdir -p "$work" "$seeds" "$art"
  rm -f "$seeds"/*
  # Dataset seeds carry the format-picking byte first (fuzz/fuzz_dataset.cpp).
  if [ "$t" = dataset ] && [ -d "$fixtures/datasets" ]; then
    local i=0 f fmt pick
    while IFS= read -r -d '' f; do
      [ "$(stat -c %s "$f")" -le 65535 ] || continue
      for fmt in 0 1 2 3; do
        pick=$fmt; case "$f" in *.jsonl) ;; *) pick=$((fmt | 8)) ;; esac
        { printf "\\x$(printf %02x $pick)"; cat "$f"; } > "$seeds/fixture-$i-$fmt"
      done
      i=$((i + 1))
    done < <(find "$fixtures/datasets" -name '*.json*' -print0)
  fi
  for f in $(fixture_seeds "$t"); do cp "$f" "$seeds/fixture-$(basename "$f")"; done
  local rc=0
  build-asan/fuzz/fuzz_"$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -max_len="$(max_len "$t")" -print_final_stats=1 -artifact_prefix="$art" \
    "$work" fuzz/corpus/"$t" "$seeds" >"$log" 2>&1 || rc=$?
  local execs corpus result
  execs=$(grep -h '^stat::number_of_executed_units' "$log" | awk '{s += $2} END {print s + 0}')
  corpus=$(ls "$work" | wc -l)
  if [ $rc -eq 0 ]; then result=ok; else result="FAILED (rc $rc, $art)"; fi
  echo "$t | $seconds | $execs | $((execs / (seconds > 0 ? seconds : 1))) | $corpus | $result" > "$out/$t.result"
  echo "fuzz_$t: $result, $execs executions"
}

echo "fuzz.sh: ${#targets[@]} targets, $seconds s each, $parallel at a time"
running=0
for t in "${targets[@]}"; do
  rm -f "$out/$t.result"
  fuzz_one "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$parallel" ]; then wait -n || true; running=$((running - 1)); fi
done
wait
failed=()
table="target | seconds | executions | exec/s | new corpus | result"$'\n'
for t in "${targets[@]}"; do
  line=$(cat "$out/$t.result" 2>/dev/null || echo "$t | $seconds | 0 | 0 | 0 | FAILED (no result)")
  table+="$line"$'\n'
  case "$line" in *FAILED*) failed+=("$t"); echo "== $out/$t.log (end)"; tail -30 "$out/$t.log" ;; esac
done
echo
printf '%s' "$table" | column -t -s '|'
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: ${failed[*]} failed; the inputs are in $out/artifacts/ (logs $out/<target>.log)" >&2
  if [ "$warn_only" = 1 ]; then
    for t in "${failed[@]}"; do
      for a in "$out/artifacts/$t/"*; do
        [ -f "$a" ] && echo "WARNING: new fuzz finding $t: $(basename "$a"), base64: $(base64 -w0 "$a")" >&2
      done
    done
    echo "WARNING: fuzz.sh --warn-only: the findings above are new bugs to fix (docs/reliability.md)" >&2
    exit 0
  fi
  exit 1
fi
