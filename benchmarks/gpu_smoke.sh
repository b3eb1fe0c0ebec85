#!/usr/bin/env bash
# Issue 23: the ImageNet-shaped configs for a few distillation iterations on a generated stand-in; prints
# iterations per second and peak GPU memory (benchmarks/gpu_smoke.py).
#
#   benchmarks/gpu_smoke.sh [extra gpu_smoke.py arguments, e.g. --mixed_precision bf16 --iterations 10]
#
# On a machine without a GPU it runs on the CPU at a reduced size (20 classes, 20 images per unrolled step, 2
# iterations), which checks the script and the loop, not the figures; it then prints the peak resident memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296} MALLOC_TOP_PAD_=${MALLOC_TOP_PAD_:-1073741824}
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    SIZE=(--iterations 5)
else
    echo "no GPU: a CPU check at a reduced size (the figures are not the GPU's)"
    SIZE=(--device cpu --iterations 2 --classes 20 --syn_batch_size 20 --per_class 4)
fi
for config in recipes/configs/imagenet_64_ipc1.yaml recipes/configs/imagenet_64_ipc2.yaml \
              recipes/configs/imagenet_64_ipc10.yaml; do
    "$PYTHON" benchmarks/gpu_smoke.py --config "$config" "${SIZE[@]}" "$@"
done
