#!/usr/bin/env bash
# Issue 23: the ImageNet-shaped configs for a few distillation iterations on a generated stand-in; prints
# iterations per second and peak GPU memory (benchmarks/gpu_smoke.py) and appends each run's JSON line to
# $GPU_SMOKE_OUT/results.jsonl (default outputs/gpu_smoke).
#
#   benchmarks/gpu_smoke.sh [extra gpu_smoke.py arguments, e.g. --iterations 20]
#
# On a GPU: the three configs in float32, ipc1 again with the host syncs counted, the three in bf16 autocast (200
# images per unrolled step, ipc1's whole subtask, or 100 if 200 runs out of memory), then ipc1 with the compiled
# inner step.
# RUN_TIMEOUT (seconds, default 600) bounds each run. Without a GPU it runs on the CPU at a reduced size (20
# classes, 20 images per unrolled step, 2 iterations, float32), which checks the script and the loop, not the
# figures; it then prints the peak resident memory.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${GPU_SMOKE_OUT:-outputs/gpu_smoke}
mkdir -p "$OUT_DIR"
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296} MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_:-1073741824}
CONFIGS=(recipes/configs/imagenet_64_ipc1.yaml recipes/configs/imagenet_64_ipc2.yaml
         recipes/configs/imagenet_64_ipc10.yaml)

failed=0  # the exit status: 1 if any run failed for good (a run that succeeded at 100 images does not count)
run() {  # one gpu_smoke.py run; a failure (out of memory, timeout: 124) is reported and returned
    timeout "${RUN_TIMEOUT:-600}" "$PYTHON" benchmarks/gpu_smoke.py --json_out "$OUT_DIR/results.jsonl" "$@"
    local rc=$?
    [ $rc -eq 0 ] || echo "FAILED (exit $rc): gpu_smoke.py $*"
    return $rc
}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no GPU: a CPU check at a reduced size (the figures are not the GPU's)"
    for config in "${CONFIGS[@]}"; do
        run --config "$config" --device cpu --iterations 2 --classes 20 --syn_batch_size 20 --per_class 4 "$@" ||
            failed=1
    done
    exit $failed
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for precision in no bf16; do
    for config in "${CONFIGS[@]}"; do
        run --config "$config" --mixed_precision "$precision" --iterations 10 --syn_batch_size 200 "$@"
        rc=$?
        if [ $rc -eq 124 ]; then
            failed=1
        elif [ $rc -ne 0 ]; then
            run --config "$config" --mixed_precision "$precision" --iterations 10 --syn_batch_size 100 "$@" ||
                failed=1
        fi
    done
    if [ "$precision" = no ]; then
        run --config "${CONFIGS[0]}" --sync_debug --iterations 3 "$@" || failed=1
    fi
done
run --config "${CONFIGS[0]}" --compile --iterations 10 "$@" || failed=1
exit $failed
