#!/usr/bin/env bash
# strata's GPU benchmark: every figure BENCHMARKS.md records from a GPU machine, in one run.
#
# Usage: tools/gpu-bench.sh [--quick|--full] [BINARY] [OUT_DIR]
#   BINARY   the release binary (default target/release/strata; build it where the toolchain is:
#            `cargo build --release`); the GPU machine needs no Rust toolchain.
#   OUT_DIR  where every JSON goes (default "$OUT" when set, else target/gpu-bench).
#   --quick  kernels and the all-GPU opt-6.7b workload only (about 4 minutes on an H200);
#            the default adds the offloading, compression and opt-30b runs of issues 11 and 13 (--full: opt-175b too).
#
# Each run has its own time limit and its own files: NAME.json (what the command printed), NAME.err (its stderr) and
# a line in summary.txt. A run that fails or times out is recorded as such and the next one starts.
set -uo pipefail

mode=default
if [[ "${1:-}" == --quick || "${1:-}" == --full ]]; then
    mode=${1#--}
    shift
fi
bin=${1:-target/release/strata}
out=${2:-${OUT:-target/gpu-bench}}
mkdir -p "$out"
if [[ ! -x "$bin" ]]; then
    echo "gpu-bench: no strata binary at $bin (build it with: cargo build --release)" >&2
    exit 2
fi
summary="$out/summary.txt"
: >"$summary"

# run NAME SECONDS ARGS...: one strata command under a time limit.
run() {
    local name=$1 limit=$2
    shift 2
    local start end rc
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$bin" "$@" >"$out/$name.json" 2>"$out/$name.err"
    rc=$?
    end=$(date +%s)
    local status=ok
    if [[ $rc == 124 || $rc == 137 ]]; then
        status="timed out after ${limit}s"
    elif [[ $rc != 0 ]]; then
        status="failed (exit $rc): $(grep -m1 -i error "$out/$name.err" || tail -n1 "$out/$name.err")"
    fi
    printf '%-28s %4ss  %s  strata %s\n' "$name" "$((end - start))" "$status" "$*" | tee -a "$summary"
}

{
    date -u +"date: %Y-%m-%dT%H:%M:%SZ"
    echo "binary: $bin ($("$bin" --version 2>/dev/null))"
    echo "mode: $mode"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} | tee -a "$summary"

workload=(--dummy --prompt-len 512 --gen-len 32 --json)

# Issue 10: the kernels on fixed shapes, then opt-6.7b all on the GPU (HF: 1,204 token/s decode at batch 64;
# FlexLLMGen: 843 token/s total at 32 x 2).
run kernels 150 bench kernels --json
run opt-6.7b-gpu-64x1 120 bench --model opt-6.7b "${workload[@]}" --gpu-batch-size 64
run opt-6.7b-gpu-32x2 120 bench --model opt-6.7b "${workload[@]}" --gpu-batch-size 32 --num-gpu-batches 2

if [[ $mode != quick ]]; then
    # Issue 11: weights on the CPU (FlexLLMGen 226.8 token/s decode; PCIe ceiling 266) and opt-30b with the cache
    # on the CPU, both attention paths (FlexLLMGen 13.8 token/s total).
    run opt-6.7b-wcpu-32x2 150 bench --model opt-6.7b "${workload[@]}" --percent 0 100 100 0 100 0 \
        --gpu-batch-size 32 --num-gpu-batches 2
    run opt-30b-ccpu-gpuattn 300 bench --model opt-30b "${workload[@]}" --percent 20 80 0 100 0 100 \
        --gpu-batch-size 24 --num-gpu-batches 2
    run opt-30b-ccpu-cpuattn 300 bench --model opt-30b "${workload[@]}" --percent 20 80 0 100 0 100 \
        --gpu-batch-size 24 --num-gpu-batches 2 --cpu-cache-compute
    # Issue 13: the same opt-30b run compressed (target: 1.3x uncompressed).
    run opt-30b-ccpu-compressed 300 bench --model opt-30b "${workload[@]}" --percent 20 80 0 100 0 100 \
        --gpu-batch-size 24 --num-gpu-batches 2 --compress-weight --compress-cache
fi
if [[ $mode == full ]]; then
    # FlexLLMGen's headline: opt-175b on one GPU with packed weights.
    run opt-175b-packed 600 bench --model opt-175b "${workload[@]}" --percent 100 0 0 100 0 100 \
        --gpu-batch-size 8 --num-gpu-batches 2 --compress-weight
fi
echo "gpu-bench: results in $out" | tee -a "$summary"
