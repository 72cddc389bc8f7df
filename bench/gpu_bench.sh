#!/usr/bin/env bash
# The GPU benchmarks in one go (builds nothing: build first with scripts/build.sh):
#   1. build/bench/bench_cuda_ops --json     per-op times vs cuBLAS / copy-bandwidth ceilings
#   2. build/bench/bench_cuda_train --json   qlora's training step (skipped with a note when absent)
#   3. bench/hf_baseline.py --json           transformers + PEFT (+ bitsandbytes) on the same shapes
# then prints the side-by-side table (ours vs HF: tokens/s, MFU, peak memory, ratios) from the JSON
# files. docs/benchmarks.md, "GPU benchmarks: how to run", explains every column.
#
# Usage: bench/gpu_bench.sh [--quick] [--out DIR] [--no-hf] [--summarize DIR]
#   --quick          small shapes / few layers: a smoke run of the whole pipeline (minutes)
#   --out DIR        where the JSON files and logs go (default $BUILD_DIR/bench-results/<UTC time>)
#   --no-hf          skip the transformers baseline
#   --summarize DIR  only print the tables from the JSON files already in DIR
# Environment: BUILD_DIR (default build), PYTHON (default python3), PEAK_TFLOPS (the GPU's dense
# bf16 peak for MFU when the built-in table does not know it).
set -uo pipefail
cd "$(dirname "$0")/.."

build_dir=${BUILD_DIR:-build}
python=${PYTHON:-python3}
quick=()
out=""
run_hf=1
summarize_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick) ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    --no-hf) run_hf=0 ;;
    --summarize) summarize_only=${2:?--summarize needs a folder}; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Prints the side-by-side tables from ops.json, train.json and hf.json in folder $1 (each optional).
summarize() {
  "$python" - "$1" <<'PY'
import json, os, sys

folder = sys.argv[1]

def load(name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        print("warning: %s is not valid JSON (%s)" % (path, e))
        return None

def gib(b):
    return "%.1f" % (b / 2**30) if b else "n/a"

ops, train, hf = load("ops.json"), load("train.json"), load("hf.json")

if ops:
    rows = [r for r in ops.get("rows", []) if r.get("target") is not None]
    print("\n== Targets of the ops benchmark (%s) ==" % ops.get("gpu", "?"))
    print("| op | shape | algo | measured | of ceiling | target | met |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print("| %s | %s | %s | error: %s | | | NO |" % (r["op"], r["shape"], r.get("algo", ""), r["error"]))
            continue
        unit = r.get("unit", "")
        print("| %s | %s | %s | %.1f %s | %.1f%% | >= %.0f%% | %s |" % (
            r["op"], r["shape"], r.get("algo", ""), r["rate"], unit, 100 * r["ratio"], 100 * r["target"],
            "yes" if r["ratio"] >= r["target"] else "NO"))
    if not rows:
        print("(no row carries a target)")
    if not ops.get("complete", True):
        print("warning: bench_cuda_ops stopped early; the table above is partial")

if train or hf:
    peak_env = float(os.environ.get("PEAK_TFLOPS", "0") or 0)
    peak = peak_env or (hf or {}).get("peak_bf16_tflops") or (train or {}).get("peak_bf16_tflops")
    ours = {r["model"]: r for r in (train or {}).get("results", [])}
    base = {r["model"]: r for r in (hf or {}).get("results", [])}
    print("\n== Training step: qlora vs transformers + PEFT (%s) ==" % ((hf or train).get("gpu", "?")))
    if hf:
        print("HF base: %s%s" % (hf.get("base"), (" (" + hf["base_note"] + ")") if hf.get("base_note") else ""))
    if peak:
        print("MFU: useful FLOPs (docs/benchmarks.md) / %.1f TFLOP/s dense bf16 peak" % peak)
    print("| model | layers | seq | ours tok/s | HF tok/s | speedup | ours MFU | HF MFU "
          "| ours peak GiB | HF peak GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def mfu(r, flops_per_token):
        if r.get("mfu") is not None:
            return r["mfu"]
        if peak and flops_per_token and r.get("tokens_per_s"):
            return flops_per_token * r["tokens_per_s"] / 1e12 / peak
        return None

    def cell(r, key, fmt):
        if r is None:
            return "absent"
        if r.get("status", "ok") != "ok":
            return r["status"]
        v = r.get(key)
        return fmt % v if v is not None else "n/a"

    for model in list(dict.fromkeys(list(ours) + list(base))):
        o, h = ours.get(model), base.get(model)
        ok_o = o is not None and o.get("status", "ok") == "ok"
        ok_h = h is not None and h.get("status", "ok") == "ok"
        fpt = (h or {}).get("useful_flops_per_token") or (o or {}).get("useful_flops_per_token")
        speed = mem = "n/a"
        if ok_o and ok_h:
            if (o.get("seq"), o.get("layers")) != (h.get("seq"), h.get("layers")):
                speed = mem = "shapes differ"
            else:
                speed = "%.2fx" % (o["tokens_per_s"] / h["tokens_per_s"])
                if o.get("peak_allocated_bytes") and h.get("peak_allocated_bytes"):
                    mem = "%.2f" % (o["peak_allocated_bytes"] / h["peak_allocated_bytes"])
        mo = mfu(o, fpt) if ok_o else None
        mh = mfu(h, fpt) if ok_h else None
        src = o if ok_o else h or {}
        print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            model, src.get("layers", "?"), src.get("seq", "?"),
            cell(o, "tokens_per_s", "%.0f"), cell(h, "tokens_per_s", "%.0f"), speed,
            "%.1f%%" % (100 * mo) if mo is not None else "n/a", "%.1f%%" % (100 * mh) if mh is not None else "n/a",
            gib(o.get("peak_allocated_bytes")) if ok_o else cell(o, "x", ""),
            gib(h.get("peak_allocated_bytes")) if ok_h else cell(h, "x", ""), mem))
    for side, table in (("qlora", ours), ("HF", base)):
        for model, r in table.items():
            if r.get("status", "ok") != "ok":
                print("%s %s %s: %s" % (side, model, r["status"], r.get("reason", "")))
    print("speedup = ours / HF tokens/s; memory ratio = ours / HF peak allocated (lower is better).")
    print("Targets: MFU >= 50%; several times HF's tokens/s at lower peak memory.")

if train:
    budget = train.get("budget_bytes") or next(
        (r["budget_bytes"] for r in train.get("results", []) if r.get("budget_bytes")), None)
    g = train.get("cublas_gemm") or {}
    print("\n== qlora's step: ceiling, memory plan, budget (%s) ==" % train.get("gpu", "?"))
    if g.get("tflops"):
        print("of cuBLAS: useful FLOP rate / %.1f TFLOP/s (cuBLAS bf16 GEMM %sx%sx%s, same run)"
              % (g["tflops"], g.get("m"), g.get("n"), g.get("k")))
    fits_hdr = "fits %s GiB" % gib(budget) if budget else "fits budget"
    print("| model | layers | tok/s | MFU | of cuBLAS | peak used GiB | plan GiB | plan error | %s |" % fits_hdr)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in train.get("results", []):
        if r.get("status", "ok") != "ok":
            print("| %s | %s | %s: %s | | | | | | |" % (r["model"], r.get("layers", "?"), r["status"],
                                                      r.get("reason", "")))
            continue
        m = r.get("mfu")
        if m is None and peak and r.get("useful_flops_per_token"):
            m = r["useful_flops_per_token"] * r["tokens_per_s"] / 1e12 / peak
        plan = (r.get("plan") or {}).get("device_bytes")
        err = r.get("plan_error")
        print("| %s | %s | %.0f | %s | %s | %s | %s | %s | %s |" % (
            r["model"], r.get("layers", "?"), r["tokens_per_s"], "%.1f%%" % (100 * m) if m is not None else "n/a",
            "%.1f%%" % (100 * r["mfu_vs_cublas"]) if r.get("mfu_vs_cublas") is not None else "n/a",
            gib(r.get("peak_device_used_bytes")), gib(plan), "%+.1f%%" % (100 * err) if err is not None else "n/a",
            {True: "yes", False: "NO"}.get(r.get("fits_budget"), "n/a")))
        e = r.get("extrapolated")
        if e:
            print("| %s (EXTRAPOLATED, not measured) | %s | %.0f | | | %s | %s | | %s |" % (
                r["model"], e.get("layers", "?"), e["tokens_per_s"], gib(e.get("peak_device_used_bytes")),
                gib(e.get("plan_device_bytes")), {True: "yes", False: "NO"}.get(e.get("fits_budget"), "n/a")))
    print("peak used: the device's used memory (context included); plan: the planner's device total for the same "
          "run; plan error = (plan - peak used) / peak used.")
    print("Target: the 70B shape inside a 48 GB budget (the llama-2-70b row's fits column).")
PY
}

if [ -n "$summarize_only" ]; then
  summarize "$summarize_only"
  exit $?
fi

out=${out:-$build_dir/bench-results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out" || exit 1
status=0

echo "date:   $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
if command -v nvidia-smi >/dev/null 2>&1; then
  echo "GPU:    $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
else
  echo "GPU:    nvidia-smi not found"
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "$commit" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then commit="$commit (+ uncommitted changes)"; fi
echo "commit: $commit"
echo "output: $out"
echo

echo "== 1/3 bench_cuda_ops =="
if [ -x "$build_dir/bench/bench_cuda_ops" ]; then
  "$build_dir/bench/bench_cuda_ops" "${quick[@]}" --json "$out/ops.json" 2>&1 | tee "$out/ops.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "bench_cuda_ops failed (exit $rc)"; status=1; fi
else
  echo "skipped: $build_dir/bench/bench_cuda_ops not found (build with CUDA: scripts/build.sh)"
  status=1
fi

echo
echo "== 2/3 bench_cuda_train =="
if [ -x "$build_dir/bench/bench_cuda_train" ]; then
  "$build_dir/bench/bench_cuda_train" "${quick[@]}" --shapes-file bench/shapes.json --json "$out/train.json" 2>&1 |
    tee "$out/train.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "bench_cuda_train failed (exit $rc)"; status=1; fi
else
  echo "skipped: $build_dir/bench/bench_cuda_train not found (build with CUDA: scripts/build.sh)"
  status=1
fi

echo
echo "== 3/3 transformers + PEFT baseline =="
if [ "$run_hf" -eq 1 ]; then
  "$python" bench/hf_baseline.py "${quick[@]}" --json "$out/hf.json" 2>&1 | tee "$out/hf.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "hf_baseline.py failed (exit $rc)"; status=1; fi
else
  echo "skipped (--no-hf)"
fi

summarize "$out" || status=1
echo
echo "JSON and logs: $out"
exit $status
