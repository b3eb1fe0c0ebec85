#!/usr/bin/env bash
# The paper's network on a Tiny ImageNet subset on one GPU (benchmarks/gpu_tinyimagenet.py), in two steps; docs/gpu.md
# gives the device tool's call.
#
#   benchmarks/gpu_tinyimagenet.sh prepare    # here: the subset and the wheels the device machine lacks, both under
#                                             # outputs/gpu_tinyimagenet/ (ignored), to carry there
#   benchmarks/gpu_tinyimagenet.sh [gpu_tinyimagenet.py arguments or D3 overrides]    # there: the benchmark
#
# The device machine's python3 has torch, transformers and accelerate but not datasets, diffusers or kornia
# (/work/.library/device/KINDS.md): they travel as wheels of the versions this checkout's venv has and are installed
# in /tmp/site. hf_d3 runs from src/. With $OUT set (the device tool's), the log, the results file and the run's
# metrics are copied there. Rerun on the same warm machine to continue a cut run: its stages are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=outputs/gpu_tinyimagenet
PACKAGES=(datasets diffusers kornia kornia_rs dill multiprocess importlib_metadata)
# this checkout's venv where there is one (here), else the machine's python3 (the device machine's holds torch)
[ -x .venv/bin/python ] && DEFAULT_PYTHON=.venv/bin/python || DEFAULT_PYTHON=python3
PYTHON=${PYTHON:-$DEFAULT_PYTHON}

if [ "${1:-}" = prepare ]; then
    "$PYTHON" benchmarks/tinyimagenet_subset.py --output_dir "$DIR/subset"
    mapfile -t pinned < <("$PYTHON" -c 'import sys, importlib.metadata as m
print("\n".join(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' "${PACKAGES[@]}")
    rm -rf "$DIR/wheels"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$DIR/wheels" "${pinned[@]}"
    du -sh "$DIR/subset" "$DIR/wheels"
    echo "carry: $DIR/subset $DIR/wheels (with the tree, under the device tool's 64 MiB)"
    exit 0
fi

if ! "$PYTHON" -c "import datasets, diffusers, kornia" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$DIR"/wheels/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
status=0
"$PYTHON" benchmarks/gpu_tinyimagenet.py --data "$DIR/subset" --output_dir "$DIR/run" "$@" 2>&1 |
    tee "${OUT:-$DIR}/gpu_tinyimagenet.log" || status=$?
if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/gpu_tinyimagenet.json "$OUT/" 2>/dev/null || true
    for run in "$DIR"/run/d3_ipc*/; do
        [ -f "$run/metrics.json" ] && cp "$run/metrics.json" "$OUT/metrics_$(basename "$run").json"
    done
fi
exit $status
