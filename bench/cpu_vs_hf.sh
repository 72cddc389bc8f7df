#!/usr/bin/env bash
# The CPU engine against transformers + PEFT on the same machine, in one run, as one table
# (docs/benchmarks.md records it; not part of CI: a full run takes hours on 2 cores).
#
# Per model shape (random weights of the published configs in bench/shapes.json "cpu_models") and seq:
# one training step measurement per process (so peak RSS is that configuration's), LoRA r 16 on all
# seven block linears, micro-batch 2, the same thread count on both sides (OMP_NUM_THREADS =
# torch.set_num_threads), gradient checkpointing on both sides (--no-checkpointing: off on both):
#   qlora      bench_cpu_engine --train (NF4 base, the trainer's step; its memory plan beside its RSS)
#   hf-fp32    bench/hf_cpu_peer.py --base fp32 (transformers + PEFT, fp32 base)
#   hf-nf4     bench/hf_cpu_peer.py --base nf4 (+ bitsandbytes 4-bit NF4 base on its CPU backend)
# plus the fp32 GEMM ceiling through OpenBLAS and through torch (CPU MFU uses the higher), and batch-1
# generation tokens/s of qlora against llama.cpp (llama-cpp-python) on the SmolLM2 fixture GGUF.
#
# Usage: bench/cpu_vs_hf.sh [--quick] [--models a,b] [--seqs 256,1024] [--steps N] [--warmup N]
#                           [--no-checkpointing] [--no-nf4] [--no-generate]
#   --quick: smollm2-135m at seq 256 only (1 warm-up + 2 timed steps, as the default).
# Environment: QLORA_BUILD_DIR (default build; needs -DQLORA_BUILD_BENCH=ON), QLORA_INTEROP_VENV
# (default build/interop-venv, created with scripts/interop-venv.sh when missing), OMP_NUM_THREADS
# (default nproc), QLORA_FIXTURES (default ../shared/fixtures).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${QLORA_BUILD_DIR:-$root/build}"
venv="${QLORA_INTEROP_VENV:-$root/build/interop-venv}"
fixtures="${QLORA_FIXTURES:-$root/../shared/fixtures}"
models="smollm2-135m,qwen2.5-0.5b,llama-3.2-1b"
seqs="256,1024"
steps=2
warmup=1
ckpt=1
nf4=1
gen=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) models="smollm2-135m"; seqs="256" ;;
        --models) models="$2"; shift ;;
        --seqs) seqs="$2"; shift ;;
        --steps) steps="$2"; shift ;;
        --warmup) warmup="$2"; shift ;;
        --no-checkpointing) ckpt=0 ;;
        --no-nf4) nf4=0 ;;
        --no-generate) gen=0 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "cpu_vs_hf: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

engine="$build/bench/bench_cpu_engine"
if [[ ! -x "$engine" ]]; then
    echo "cpu_vs_hf: $engine not found; build it: cmake -S . -B $build -DQLORA_BUILD_BENCH=ON && cmake --build $build --target bench_cpu_engine" >&2
    exit 1
fi
if [[ ! -x "$venv/bin/python" ]]; then
    QLORA_INTEROP_VENV="$venv" "$root/scripts/interop-venv.sh"
fi
py="$venv/bin/python"
threads="${OMP_NUM_THREADS:-$(nproc)}"
# libgomp's spinning waits fight OpenBLAS's threads (docs/engine.md); qlora sets this itself.
export OMP_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" OMP_WAIT_POLICY=passive
out="$(mktemp /tmp/cpu_vs_hf.XXXXXX.jsonl)"
trap 'rm -f "$out" "$out.err"' EXIT

echo "cpu_vs_hf: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown), $threads threads, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load at start:$(uptime | sed 's/.*load average//')"
run() {  # label, command...: appends the command's JSON line(s) to $out, or a note on failure
    local label="$1"; shift
    echo "  $label ..." >&2
    if ! "$@" 2>"$out.err" | grep '^{' >> "$out"; then
        echo "  $label failed:" >&2
        tail -5 "$out.err" >&2
    fi
}
run "gemm ceiling (OpenBLAS)" "$engine" --gemm-ceiling
run "gemm ceiling (torch)" "$py" "$root/bench/hf_cpu_peer.py" --gemm-ceiling --threads "$threads"
ck_engine=(); ck_peer=(--checkpointing)
if [[ $ckpt == 0 ]]; then ck_engine=(--no-checkpointing); ck_peer=(); fi
IFS=, read -r -a model_list <<< "$models"
IFS=, read -r -a seq_list <<< "$seqs"
for m in "${model_list[@]}"; do
    for t in "${seq_list[@]}"; do
        common=(--seq "$t" --batch 2 --steps "$steps" --warmup "$warmup")
        run "$m seq $t qlora" "$engine" --train "$m" "${common[@]}" "${ck_engine[@]}"
        run "$m seq $t hf fp32" "$py" "$root/bench/hf_cpu_peer.py" --train "$m" --base fp32 "${common[@]}" \
            --threads "$threads" "${ck_peer[@]}"
        if [[ $nf4 == 1 ]]; then
            run "$m seq $t hf nf4" "$py" "$root/bench/hf_cpu_peer.py" --train "$m" --base nf4 "${common[@]}" \
                --threads "$threads" "${ck_peer[@]}"
        fi
    done
done
if [[ $gen == 1 ]]; then
    gguf="$(ls "$fixtures"/models/smollm2-135m-instruct/*.gguf 2>/dev/null | head -1 || true)"
    if [[ -n "$gguf" ]]; then
        run "generate qlora" "$engine" --generate "$gguf" --tokens 64
        run "generate llama.cpp" "$py" "$root/bench/hf_cpu_peer.py" --generate "$gguf" --tokens 64 --threads "$threads"
    else
        echo "cpu_vs_hf: no SmolLM2 GGUF under $fixtures/models/smollm2-135m-instruct: generation skipped" >&2
    fi
fi
echo "load at end:$(uptime | sed 's/.*load average//')"
"$py" "$root/bench/hf_cpu_peer.py" --table "$out"
