#!/usr/bin/env bash
# Issue 23: one whole run on a GPU (image cache, experts, warm start, distillation, relabelling, students) of the
# 64x64 ImageNet recipe on a generated 100-class stand-in, in bf16 autocast through `accelerate launch`, with every
# phase cut short: a check that every phase runs on the device, not a figure of accuracy.
#
#   benchmarks/gpu_end_to_end.sh [distill.py overrides, e.g. --iterations 100]
#
# Writes the stand-in and the run under $GPU_E2E_OUT (default outputs/gpu_end_to_end) and prints the run's metrics
# (metrics.json without its lists). Without a GPU Accelerate runs it on the CPU, slowly at these widths: shrink it
# with overrides (`--net_width 8 --net_depth 2 --iterations 3 --syn_steps 2 --eval_steps 5`: 3 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${GPU_E2E_OUT:-outputs/gpu_end_to_end}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
[ -d "$OUT_DIR/stand_in" ] ||
    "$PYTHON" benchmarks/imagenet_stand_in.py --num_classes 100 --per_class 50 --output_dir "$OUT_DIR/stand_in"
"$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    --dynamo_backend no recipes/distill.py --config recipes/configs/imagenet_64_ipc1.yaml \
    --dataset "$OUT_DIR/stand_in" --test_split test --output_dir "$OUT_DIR/run" --num_subtasks 2 \
    --num_experts 2 --trajectory_epochs 4 --max_start_epoch 2 --iterations 50 --teacher_epochs 3 \
    --eval_steps 300 --eval_seeds 1 "$@"
"$PYTHON" - "$OUT_DIR/run/metrics.json" <<'PY'
import json, sys
metrics = json.load(open(sys.argv[1]))
print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list | dict)}))
print(json.dumps([{k: s[k] for k in ("subtask", "iterations_run", "iterations_wall_time_s", "peak_memory_bytes")}
                  for s in metrics["subtasks"]]))
PY
