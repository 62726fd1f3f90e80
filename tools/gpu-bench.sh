#!/usr/bin/env bash
# strata's GPU benchmark: the figures BENCHMARKS.md records from a GPU machine, one command per issue's targets.
#
# Usage: tools/gpu-bench.sh [MODE] [BINARY] [OUT_DIR]
#   MODE     kernels (default): `bench kernels` and opt-6.7b all on the GPU (issue 10), about 4 minutes on an H200;
#            offload: `strata profile`, then opt-6.7b with weights on the CPU through both decode transfer paths (copy
#            into weight slots, zero-copy) (issue 11); offload-30b: `strata profile`, then opt-30b with the cache on the
#            CPU, both attention paths (issue 11); compress: opt-30b compressed and opt-175b with packed weights (issue 13); smoke: every
#            mode's commands on opt-125m with tiny shapes, to check the script itself on any machine (lavapipe).
#            Each mode fits one 10-minute call of the device tool; run them in this order as time allows.
#   BINARY   the release binary (default target/release/strata; build it where the toolchain is:
#            `cargo build --release`); the GPU machine needs no Rust toolchain.
#   OUT_DIR  where every file goes (default "$OUT" when set, else target/gpu-bench).
#
# Each run has its own time limit and its own files: NAME.json (what the command printed), NAME.err (its stderr) and
# a line in summary.txt. A run that fails or times out is recorded as such and the next one starts.
set -uo pipefail

mode=${1:-kernels}
case $mode in
kernels | offload | offload-30b | compress | smoke) ;;
*)
    echo "gpu-bench: unknown mode '$mode' (kernels, offload, offload-30b, compress or smoke)" >&2
    exit 2
    ;;
esac
bin=${2:-target/release/strata}
out=${3:-${OUT:-target/gpu-bench}}
mkdir -p "$out"
if [[ ! -x "$bin" ]]; then
    echo "gpu-bench: no strata binary at $bin (build it with: cargo build --release)" >&2
    exit 2
fi
summary="$out/summary-$mode.txt"
: >"$summary"

# run NAME SECONDS ARGS...: one strata command under a time limit.
run() {
    local name=$1 limit=$2
    shift 2
    local start end rc status=ok
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$bin" "$@" >"$out/$name.json" 2>"$out/$name.err"
    rc=$?
    end=$(date +%s)
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
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    fi
} | tee -a "$summary"

# The workloads: FlexLLMGen's prompt 512 / gen 32 on the real models, or opt-125m with tiny shapes (smoke). Each run
# first generates 2 tokens untimed (`--warmup`, as FlexLLMGen's benchmark does), so pipeline compilation and first
# touches of memory stay out of the prefill figure.
if [[ $mode == smoke ]]; then
    small=opt-125m big=opt-125m huge=opt-125m
    workload=(--dummy --prompt-len 8 --gen-len 3 --warmup --json)
    kernels_args=(--scale 64 --reps 1 --iters 1)
    scale_batch() { echo 2; }
else
    small=opt-6.7b big=opt-30b huge=opt-175b
    workload=(--dummy --prompt-len 512 --gen-len 32 --warmup --json)
    kernels_args=()
    scale_batch() { echo "$1"; }
fi

if [[ $mode == kernels || $mode == smoke ]]; then
    # Issue 10: the kernels on fixed shapes, then opt-6.7b all on the GPU (HF: 1,204 token/s decode at batch 64;
    # FlexLLMGen: 843 token/s total at 32 x 2).
    run kernels 200 bench kernels --json "${kernels_args[@]}"
    run "$small-gpu-64x1" 150 bench --model "$small" "${workload[@]}" --gpu-batch-size "$(scale_batch 64)"
    run "$small-gpu-32x2" 150 bench --model "$small" "${workload[@]}" --gpu-batch-size "$(scale_batch 32)" \
        --num-gpu-batches 2
fi
if [[ $mode == offload || $mode == offload-30b || $mode == smoke ]]; then
    # Issue 11: this machine's transfer and compute rates through strata's own paths (the cost model's profile; each
    # bench reads its bandwidths for the PCIe-bound ceiling it reports beside the transfers it counted).
    run profile 90 profile --out "$out/profile.toml" --disk-bytes 1GiB
    pcie=()
    [[ -f $out/profile.toml ]] && pcie=(--pcie-profile "$out/profile.toml")
fi
if [[ $mode == offload || $mode == smoke ]]; then
    # Weights on the CPU (FlexLLMGen 226.8 token/s decode; PCIe ceiling 266). 32 x 2: --transfer copy copies the
    # weights into weight slots once per block; zero-copy runs block decode steps, each layer once over both GPU
    # batches, reading them in place once per step; 64 x 1 is the same 64 sequences in one GPU batch, where auto
    # reads them in place once.
    run "$small-wcpu-32x2-copy" 150 bench --model "$small" "${workload[@]}" "${pcie[@]}" --percent 0 100 100 0 100 0 \
        --gpu-batch-size "$(scale_batch 32)" --num-gpu-batches 2 --transfer copy
    run "$small-wcpu-32x2-zerocopy" 150 bench --model "$small" "${workload[@]}" "${pcie[@]}" \
        --percent 0 100 100 0 100 0 --gpu-batch-size "$(scale_batch 32)" --num-gpu-batches 2 --transfer zero-copy
    run "$small-wcpu-64x1-auto" 150 bench --model "$small" "${workload[@]}" "${pcie[@]}" --percent 0 100 100 0 100 0 \
        --gpu-batch-size "$(scale_batch 64)" --num-gpu-batches 1
fi
if [[ $mode == offload-30b || $mode == smoke ]]; then
    # opt-30b with the cache on the CPU, both attention paths (FlexLLMGen 13.8 token/s total; target 27.6).
    run "$big-ccpu-gpuattn" 240 bench --model "$big" "${workload[@]}" "${pcie[@]}" --percent 20 80 0 100 0 100 \
        --gpu-batch-size "$(scale_batch 24)" --num-gpu-batches 2
    run "$big-ccpu-cpuattn" 240 bench --model "$big" "${workload[@]}" "${pcie[@]}" --percent 20 80 0 100 0 100 \
        --gpu-batch-size "$(scale_batch 24)" --num-gpu-batches 2 --cpu-cache-compute
fi
if [[ $mode == compress || $mode == smoke ]]; then
    # Issue 13: the opt-30b offloaded run compressed (target: 1.3x the uncompressed run of the offload mode), and
    # FlexLLMGen's headline, opt-175b on one GPU with packed weights.
    run "$big-ccpu-compressed" 250 bench --model "$big" "${workload[@]}" --percent 20 80 0 100 0 100 \
        --gpu-batch-size "$(scale_batch 24)" --num-gpu-batches 2 --compress-weight --compress-cache
    run "$huge-packed" 300 bench --model "$huge" "${workload[@]}" --percent 100 0 0 100 0 100 \
        --gpu-batch-size "$(scale_batch 8)" --num-gpu-batches 2 --compress-weight
fi
echo "gpu-bench: results in $out" | tee -a "$summary"
