#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage_* functions are called as "stage_$only_stage"
# Runs every GPU test and benchmark of a bundle made by scripts/gpu-bundle.sh, building nothing, in
# one short window on a GPU machine (docs/gpu.md). Stages, each under its own time limit, within one
# budget (default 470 s: under 8 minutes on an H100); a failing stage never stops the later ones:
#   env        GPU, driver and CUDA versions (nvidia-smi, the bundle, the binaries)
#   libs       every library of the four binaries resolves (bundled ones, cuBLAS from the machine)
#   tests      qlora_tests --gtest_filter='Cuda*:*Cases*:QuantizeDevice*:Backend*:SampleReply*'
#   ops        bench_cuda_ops: each op against the cuBLAS and copy-bandwidth ceilings
#   train-8b   bench_cuda_train on the Llama-3.1-8B shape (seq 2048): tokens/s, MFU, peak vs plan
#   hf-8b      bench/hf_baseline.py (transformers + PEFT + the bundle's bitsandbytes) on that shape
#   train-70b  bench_cuda_train on the Llama-2-70B shape, when at least 120 s of the budget are left
# Writes into OUT_DIR: summary.md (the table: stage, status, seconds, limit, key figures; planned vs
# measured GPU memory; failed tests), tables.md (bench/gpu_bench.sh's side-by-side tables), one
# <stage>.log per stage, ops.json, train.json, hf.json, train-70b.json and stages.tsv.
#
# Usage: gpu-check.sh OUT_DIR [--dry-run] [--budget SECONDS] [--bundle DIR]
#   --dry-run    for machines without a GPU (CI): every stage runs with the GPU hidden
#                (CUDA_VISIBLE_DEVICES=""), so the GPU tests and benchmarks skip, saying so; the
#                Python stage checks the script, the wheel and the imports only
#   --budget S   seconds for all stages together (default 470)
#   --bundle DIR the bundle (default: the folder of this script when it holds bin/qlora, else
#                gpu-bundle/ beside scripts/)
# Environment: PYTHON (default python3), QLORA_CUBLAS_DIR (the folder of libcublasLt.so.13 when
# the search below does not find it).
# Exit status: 0 when no stage failed or timed out, 1 otherwise, 2 for a usage error.
set -euo pipefail

usage() { sed -n '3,27p' "$0" | sed 's/^# \{0,1\}//'; }
out=""
dry_run=0
budget=470
bundle=""
only_stage=""  # internal: run one stage function and exit (so that `timeout` can limit it)
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --budget) budget=${2:?--budget needs seconds}; shift ;;
    --bundle) bundle=${2:?--bundle needs a folder}; shift ;;
    --stage) only_stage=${2:?--stage needs a name}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu-check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "gpu-check: one OUT_DIR only ('$out', '$1')" >&2; exit 2; }; out=$1 ;;
  esac
  shift
done
[ -n "$out" ] || { usage >&2; exit 2; }
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "gpu-check: --budget: expected seconds, got '$budget'" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
self="$here/$(basename "$0")"
if [ -z "$bundle" ]; then
  if [ -x "$here/bin/qlora" ]; then bundle=$here; else bundle=$here/../gpu-bundle; fi
fi
[ -x "$bundle/bin/qlora" ] || {
  echo "gpu-check: no bundle at $bundle (bin/qlora missing): make one with scripts/gpu-bundle.sh" >&2
  exit 2
}
bundle=$(cd "$bundle" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/qlora-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
mode=$([ "$dry_run" -eq 1 ] && echo "dry run (GPU hidden)" || echo "GPU run")
GPU_FILTER='Cuda*:*Cases*:QuantizeDevice*:Backend*:SampleReply*'
NO_GPU_MARK='no usable GPU, nothing measured'

# cuBLAS is not bundled (libcublasLt alone is 517 MiB): the machine's CUDA 13 provides it. Prints the
# folder of libcublasLt.so.13, or nothing.
find_cublas() {
  if [ -n "${QLORA_CUBLAS_DIR:-}" ]; then echo "$QLORA_CUBLAS_DIR"; return; fi
  local d p
  local IFS=:
  for d in ${LD_LIBRARY_PATH:-}; do
    if [ -n "$d" ] && [ -e "$d/libcublasLt.so.13" ]; then echo "$d"; return; fi
  done
  IFS=$' \t\n'
  p=$(ldconfig -p 2>/dev/null | awk '/libcublasLt\.so\.13 .*x86-64/ { print $NF; exit }' || true)
  if [ -n "$p" ]; then dirname "$p"; return; fi
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
           /usr/local/cuda-13*/lib64 /usr/local/cuda-13*/targets/x86_64-linux/lib; do
    if [ -e "$d/libcublasLt.so.13" ]; then echo "$d"; return; fi
  done
  # PyTorch's CUDA 13 wheels (nvidia-cublas): site-packages/nvidia/cu13/lib or nvidia/cublas/lib.
  "$python" - 2>/dev/null <<'PY' || true
import glob, os, site, sys
for root in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    for hit in sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcublasLt.so.13"), recursive=True)):
        print(os.path.dirname(hit))
        sys.exit(0)
PY
}
cublas_dir=$(find_cublas | head -n 1)

# The environment of the bundle's binaries: its libraries first (the GPU machine's own may be older
# or missing), then cuBLAS, then whatever the machine set (the driver's folder, often). The Python
# stage does NOT get it: torch must load its own libstdc++ and CUDA libraries.
lib_path="$bundle/lib${cublas_dir:+:$cublas_dir}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin_env=(env "LD_LIBRARY_PATH=$lib_path" "QLORA_SOURCE_DIR=$bundle/src" "QLORA_BINARY=$bundle/bin/qlora"
         "QLORA_CACHE=$work/cache" OMP_WAIT_POLICY=passive)
if [ "$dry_run" -eq 1 ]; then bin_env+=(CUDA_VISIBLE_DEVICES=); fi

# ---- the stages that are more than one command (run as `gpu-check.sh ... --stage NAME`) ----------
stage_env() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(uname -n), $(uname -sr)"
  echo "mode: $mode"
  sed -n 's/^\(made\|commit\|build\|wheel\): */bundle \1: /p' "$bundle/BUNDLE.txt"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi: $(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap \
      --format=csv,noheader 2>&1 | head -n 4 | paste -sd ';')"
    echo "nvidia-smi: $(timeout 20 nvidia-smi 2>&1 | grep -o 'CUDA Version: *[0-9.]*' | head -n 1)"
  else
    echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
  fi
  echo "cudart: bundled, from the build's CUDA: $(sed -n 's/^build:.*, nvcc //p' "$bundle/BUNDLE.txt")"
  if [ -n "$cublas_dir" ]; then
    echo "cuBLAS: $(readlink -f "$cublas_dir/libcublasLt.so.13")"
  else
    echo "cuBLAS: libcublasLt.so.13 not found (set QLORA_CUBLAS_DIR)"
  fi
  echo "python: $("$python" --version 2>&1)"
  echo "qlora: $("${bin_env[@]}" "$bundle/bin/qlora" --version)"
}

stage_libs() {
  local b missing=0
  for b in "$bundle"/bin/*; do
    echo "$(basename "$b"):"
    "${bin_env[@]}" ldd "$b" | awk '$2 == "=>" { print "  " $1 " -> " $3 }' | sed "s|$bundle/|bundle/|"
    if "${bin_env[@]}" ldd "$b" | grep -q 'not found'; then missing=1; fi
  done
  if [ "$missing" -eq 1 ]; then
    echo "missing:"
    for b in "$bundle"/bin/*; do "${bin_env[@]}" ldd "$b" | grep -o '[^[:space:]]* => not found'; done | sort -u
    return 1
  fi
}

stage_hf() {
  local hf="$bundle/src/bench/hf_baseline.py" whl whls
  shopt -s nullglob
  whls=("$bundle"/wheels/bitsandbytes-*.whl)
  whl=${whls[0]:-}
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "skipped: no $python on this machine"
    return 0
  fi
  "$python" --version
  "$python" "$hf" --help >/dev/null  # the script and shapes.json parse (no torch needed)
  if [ "$dry_run" -eq 1 ]; then
    if [ -n "$whl" ]; then
      "$python" -m zipfile -t "$whl" >/dev/null
      echo "wheel: $(basename "$whl") is a sound zip"
    fi
    if ! "$python" -c 'import torch' 2>/dev/null; then
      echo "skipped: torch is not installed for $("$python" --version 2>&1) (the GPU machine has it)"
      return 0
    fi
    "$python" -c 'import torch, transformers, peft; print("imports: torch %s, transformers %s, peft %s"
                  % (torch.__version__, transformers.__version__, peft.__version__))'
    echo "skipped: dry run (the script, the wheel and the imports checked)"
    return 0
  fi
  if [ -n "$whl" ]; then
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$whl"; then
      export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
      echo "installed $(basename "$whl") into $work/site"
    else
      echo "warning: pip could not install $(basename "$whl"): the baseline runs with a bf16 base"
    fi
  else
    echo "warning: no bitsandbytes wheel in the bundle: the baseline runs with a bf16 base"
  fi
  PYTHONUNBUFFERED=1 "$python" "$hf" --models llama-3.1-8b --warmup 2 --steps 6 --json "$out/hf.json"
}

if [ -n "$only_stage" ]; then
  case "$only_stage" in
    env|libs|hf) "stage_$only_stage"; exit $? ;;
    *) echo "gpu-check: no stage function '$only_stage'" >&2; exit 2 ;;
  esac
fi

# ---- running the stages -------------------------------------------------------------------------
t_start=$(date +%s)
deadline=$((t_start + budget))
self_args=("$out" --bundle "$bundle")
if [ "$dry_run" -eq 1 ]; then self_args+=(--dry-run); fi
printf 'stage\tstatus\tseconds\tlimit\texit\tnote\n' >"$out/stages.tsv"
rm -f "$out"/ops.json "$out"/train.json "$out"/hf.json "$out"/train-70b.json "$out"/summary.md

stage_status="" stage_secs=0 stage_limit=0 stage_rc=0 note=""
# run_stage NAME CAP MIN CMD...: runs CMD under min(CAP, what the budget has left) seconds, its
# output into NAME.log (and here); sets stage_status (ok, FAILED, TIMEOUT, skipped), stage_secs,
# stage_limit, stage_rc. Never fails itself.
run_stage() {
  local name=$1 cap=$2 min=$3
  shift 3
  local now left
  now=$(date +%s)
  left=$((deadline - now))
  stage_limit=$((cap < left ? cap : left))
  stage_secs=0
  stage_rc=0
  if [ "$stage_limit" -lt "$min" ]; then
    stage_status=skipped
    echo "no time left: $left s of the $budget s budget, the stage needs $min s" | tee "$out/$name.log"
    return 0
  fi
  echo "== $name (limit $stage_limit s) =="
  set +e
  timeout -k 10 "$stage_limit" "$@" 2>&1 | tee "$out/$name.log"
  stage_rc=${PIPESTATUS[0]}
  set -e
  stage_secs=$(($(date +%s) - now))
  case "$stage_rc" in
    0) stage_status=ok ;;
    124|137) stage_status=TIMEOUT ;;
    *) stage_status=FAILED ;;
  esac
}
record() {  # NAME: appends the stage's row to stages.tsv (a failure with no note gets its log's last line)
  if [ -z "$note" ] && [ "$stage_status" != ok ]; then
    note=$(grep -v '^[[:space:]]*$' "$out/$1.log" | tail -n 1 | cut -c 1-200 || true)
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$stage_status" "$stage_secs" "$stage_limit" "$stage_rc" \
    "${note//$'\t'/ }" >>"$out/stages.tsv"
  printf '== %s: %s (%s s of %s s)%s\n\n' "$1" "$stage_status" "$stage_secs" "$stage_limit" "${note:+: $note}"
}
# A benchmark that found no usable GPU exits 0 saying so: a skip, not a measurement. Sets note
# (and stage_status to skipped then).
gpu_skip_note() {
  note=""
  if [ "$stage_status" = ok ] && grep -q "$NO_GPU_MARK" "$out/$1.log"; then
    stage_status=skipped
    note=$(grep -m1 -o "$NO_GPU_MARK: .*" "$out/$1.log" | sed "s/^$NO_GPU_MARK: /no GPU: /")
  fi
}
timed_out_note() {
  if [ "$stage_status" = TIMEOUT ]; then note="killed at its limit; ${note}"; fi
}

echo "gpu-check: $mode of $bundle into $out, budget $budget s"
echo

run_stage env 30 5 bash "$self" "${self_args[@]}" --stage env
note=$(grep "^nvidia-smi: " "$out/env.log" | paste -sd " ")
record env

run_stage libs 30 5 bash "$self" "${self_args[@]}" --stage libs
note="all resolve; cuBLAS from ${cublas_dir:-nowhere}"
if [ "$stage_status" != ok ]; then
  note="missing: $(grep -o '^[^[:space:]]* => not found' "$out/libs.log" | awk '{ print $1 }' | paste -sd ' ')"
fi
record libs

run_stage tests 150 20 "${bin_env[@]}" "$bundle/bin/qlora_tests" "--gtest_filter=$GPU_FILTER" --gtest_color=no
note=$(awk '
  /^\[==========\] [0-9]+ tests? from .* ran/ { ran = $2 }
  /^\[  PASSED  \] [0-9]+/ { passed = $4 }
  /^\[  SKIPPED \] [0-9]+/ { skipped = $4 }
  /^\[  FAILED  \] [0-9]+ tests?, listed below/ { failed = $4 }
  /no GPU: / && why == "" { why = $0; sub(/.*no GPU: /, "no GPU: ", why) }
  END {
    if (ran == "") { print "no gtest summary (crashed or killed): see tests.log"; exit }
    printf "%d run: %d passed, %d failed, %d skipped", ran, passed, failed, skipped
    if (why != "") printf " (%s)", why
  }' "$out/tests.log")
timed_out_note
record tests

run_stage ops 100 20 "${bin_env[@]}" "$bundle/bin/bench_cuda_ops" --json "$out/ops.json"
gpu_skip_note ops
timed_out_note
record ops

run_stage train-8b 120 30 "${bin_env[@]}" "$bundle/bin/bench_cuda_train" --shapes llama-3.1-8b \
  --shapes-file "$bundle/src/bench/shapes.json" --warmup 2 --steps 6 --json "$out/train.json"
gpu_skip_note train-8b
timed_out_note
record train-8b

run_stage hf-8b 150 30 bash "$self" "${self_args[@]}" --stage hf
note=""
if [ "$stage_status" = ok ] && grep -q '^skipped: ' "$out/hf-8b.log"; then
  stage_status=skipped
  note=$(grep -m1 '^skipped: ' "$out/hf-8b.log" | sed 's/^skipped: //')
fi
timed_out_note
record hf-8b

# Host-side random weights (~39 GiB; the device machine has 128 GiB) take a while: 120 s at least.
run_stage train-70b 100000 120 "${bin_env[@]}" "$bundle/bin/bench_cuda_train" --shapes llama-2-70b \
  --shapes-file "$bundle/src/bench/shapes.json" --warmup 1 --steps 3 --json "$out/train-70b.json"
gpu_skip_note train-70b
if [ "$stage_status" = skipped ] && [ -z "$note" ]; then note=$(head -n 1 "$out/train-70b.log"); fi
timed_out_note
record train-70b

# ---- the summary --------------------------------------------------------------------------------
total=$(($(date +%s) - t_start))
if command -v "$python" >/dev/null 2>&1; then
  PYTHON="$python" timeout 60 "$bundle/src/bench/gpu_bench.sh" --summarize "$out" >"$out/tables.md" 2>&1 || true
fi
summarize() {
  "$python" - "$out" "$mode" "$budget" "$total" <<'PY'
import csv, json, os, re, sys

out, mode, budget, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
GIB = float(1 << 30)

def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def pct(x):
    return "%.1f%%" % (100 * x) if x is not None else "n/a"

def spct(x):
    return "%+.1f%%" % (100 * x) if x is not None else "n/a"

def gib(b):
    return "%.2f" % (b / GIB) if b else "n/a"

def train_figures(j):
    if not j or not j.get("results"):
        return None
    parts = []
    for r in j["results"]:
        if r.get("status") != "ok":
            parts.append("%s: %s %s" % (r.get("model"), r.get("status"), r.get("reason", "")))
            continue
        parts.append("%.0f tok/s, MFU %s, %s of cuBLAS; peak %s GiB, plan %s GiB (%s)" % (
            r["tokens_per_s"], pct(r.get("mfu")), pct(r.get("mfu_vs_cublas")),
            gib(r.get("peak_device_used_bytes")), gib((r.get("plan") or {}).get("device_bytes")),
            spct(r.get("plan_error"))))
    return "; ".join(parts)

with open(os.path.join(out, "stages.tsv")) as f:
    stages = list(csv.DictReader(f, delimiter="\t"))
figures = {}
ops = load("ops.json")
if ops and ops.get("rows"):
    rows = [r for r in ops["rows"] if r.get("target") is not None]
    met = sum(1 for r in rows if "error" not in r and r["ratio"] >= r["target"])
    errors = sum(1 for r in ops["rows"] if "error" in r)
    c = ops.get("ceilings", {})
    figures["ops"] = "%d of %d targets met, %d rows in error; cuBLAS %.0f TFLOP/s, copy %.0f GB/s%s" % (
        met, len(rows), errors, c.get("ref_gemm_tflops", 0), c.get("copy_gbps", 0),
        "" if ops.get("complete", True) else " (stopped early)")
train, train70 = load("train.json"), load("train-70b.json")
figures["train-8b"] = train_figures(train)
figures["train-70b"] = train_figures(train70)
hf = load("hf.json")
if hf and hf.get("results"):
    r = hf["results"][0]
    if r.get("status") == "ok":
        s = "%.0f tok/s, MFU %s, peak %s GiB allocated; base %s" % (
            r["tokens_per_s"], pct(r.get("mfu")), gib(r.get("peak_allocated_bytes")), hf.get("base"))
        ours = [o for o in (train or {}).get("results", []) if o.get("status") == "ok"]
        if ours:
            s += "; qlora %.2fx HF's tokens/s" % (ours[0]["tokens_per_s"] / r["tokens_per_s"])
        figures["hf-8b"] = s
    else:
        figures["hf-8b"] = "%s: %s" % (r.get("status"), r.get("reason", ""))

lines = ["# qlora GPU check: %s" % mode, ""]
env = {}
try:
    for line in open(os.path.join(out, "env.log")):
        k, _, v = line.partition(":")
        env.setdefault(k.strip(), []).append(v.strip())
except OSError:
    pass
for k in ("date", "nvidia-smi", "cudart", "cuBLAS", "bundle commit", "bundle build", "qlora", "python"):
    if k in env:
        lines.append("- %s: %s" % (k, " / ".join(env[k])))
lines += ["- budget %d s, used %d s" % (budget, total), "",
          "| stage | status | seconds | limit | key figures |", "|---|---|---|---|---|"]
for s in stages:
    key = figures.get(s["stage"]) or s["note"]
    if s["status"] in ("FAILED", "TIMEOUT") and s["exit"] not in ("", "0"):
        key = "exit %s. %s" % (s["exit"], key)
    lines.append("| %s | %s | %s | %s | %s |" % (s["stage"], s["status"], s["seconds"], s["limit"],
                                                key.replace("|", "/")))

mem = [r for j in (train, train70) if j for r in j.get("results", []) if r.get("status") == "ok"]
not_measured = [r for j in (train, train70) if j for r in j.get("results", []) if r.get("status") != "ok"]
lines += ["", "## Planned vs measured GPU memory (for src/plan/cuda_constants.h)", ""]
if mem:
    lines += ["| model | layers | peak used GiB | plan GiB | plan error | buffers measured GiB "
              "| buffers planned GiB | buffer error | before the model MiB | plan - buffers MiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in mem:
        p = r.get("plan") or {}
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %.0f | %.0f |" % (
            r["model"], r.get("layers"), gib(r.get("peak_device_used_bytes")), gib(p.get("device_bytes")),
            spct(r.get("plan_error")), gib(r.get("peak_allocated_bytes")), gib(p.get("buffer_bytes")),
            spct(r.get("plan_buffer_error")), (r.get("device_used_before_bytes") or 0) / 2**20,
            ((p.get("device_bytes") or 0) - (p.get("buffer_bytes") or 0)) / 2**20))
    lines += ["", "plan error = (plan - peak used) / peak used: negative means the planner under-forecasts. "
              "'before the model' is what the device held before the engine allocated (CUDA context, "
              "modules, cuBLAS): compare it with 'plan - buffers' (kContextBytes + the allocator reserve "
              "kAllocatorReserveFraction / kAllocatorReserveMinBytes) and set kContextBytes from it; "
              "a buffer error points at the planner's own buffer sizes instead."]
else:
    lines.append("no training-step measurement (see train-8b.log, train-70b.log)")
for r in not_measured:
    lines.append("- %s: %s, %s" % (r.get("model"), r.get("status"), r.get("reason", "")))

if os.path.exists(os.path.join(out, "tests.log")):
    failed = sorted(set(re.findall(r"^\[  FAILED  \] (\S+\.\S+)", open(os.path.join(out, "tests.log")).read(), re.M)))
    if failed:
        lines += ["", "## Failed tests (%d)" % len(failed), ""] + ["- %s" % t for t in failed]
lines += ["", "Logs: <stage>.log; JSON: ops.json, train.json, hf.json, train-70b.json; "
          "bench/gpu_bench.sh's tables: tables.md. docs/gpu.md says what to fix first."]
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
PY
}
if ! command -v "$python" >/dev/null 2>&1 || ! summarize; then
  {
    echo "# qlora GPU check: $mode (no Python for the key figures)"
    echo
    echo "| stage | status | seconds | limit | note |"
    echo "|---|---|---|---|---|"
    tail -n +2 "$out/stages.tsv" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $6 }'
  } >"$out/summary.md"
fi
echo
cat "$out/summary.md"
echo
echo "gpu-check: wrote $out (summary.md, tables.md, <stage>.log, JSON) in $total s"
if awk -F'\t' 'NR > 1 && ($2 == "FAILED" || $2 == "TIMEOUT") { bad = 1 } END { exit !bad }' "$out/stages.tsv"; then
  exit 1
fi
exit 0
