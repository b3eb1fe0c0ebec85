"""Issue 23: a few distillation iterations of a paper-scale ImageNet config, for their speed and peak memory.

    python benchmarks/gpu_smoke.py --config recipes/configs/imagenet_64_ipc1.yaml [--iterations 5]
        [--device cuda|cpu] [--mixed_precision no|bf16] [--compile] [--classes N] [--syn_batch_size B]
        [--cudnn_benchmark] [--sync_debug] [--profile FILE] [--json_out FILE]

Subtask 0 of the config (200 or 500 classes of 64x64 RGB at the paper's sizes), its latent store, decoder and
ConvNet-D4 expert built as a run builds them, on a generated stand-in: `--per_class` random images per class, made
on the device (a smoke test of the loop, not of the data path or of accuracy), and one expert trajectory of
perturbed initial weights (the loop's cost does not depend on how the expert was trained). Prints the iterations
per second (after the first, which includes one-off set-up such as cuDNN autotuning and compilation), and the peak
memory: `torch.cuda.max_memory_allocated` on a GPU, the peak resident set size on a CPU. `--classes` and
`--syn_batch_size` shrink the work (a CPU check of the script). `--sync_debug` (GPU only) counts the host syncs
by source line with `torch.cuda.set_sync_debug_mode("warn")`: the unrolled inner loop should have none; the
per-iteration loss reads and the MMD's label copy are expected. `--json_out` appends the result as one JSON line.
The result also gives the trajectory-matching unroll's floating-point operations per iteration (counted on the meta
device, so without computing them) and the rate they imply; `--profile FILE` writes torch.profiler's operator table
(CPU and CUDA time) of the iterations after the first to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
import warnings
from collections import Counter

import torch
from record import save_record  # this folder is on sys.path when the script runs
from torch.utils.flop_counter import FlopCounterMode

from hf_d3.config_parser import parse_config
from hf_d3.data import RealImages
from hf_d3.distill import FlatModel, distill_subtask, trajectory_matching_loss
from hf_d3.experts import flat_parameters
from hf_d3.factories import build_decoder, build_latent_store, build_net
from hf_d3.precision import full_precision
from hf_d3.run_plan import plan_subtasks


def _short(filename: str) -> str:
    """A source file's path from its package root (hf_d3/..., torch/...), as a sync report names it."""
    return filename.rsplit("site-packages/", 1)[-1].rsplit("/src/", 1)[-1]


def unroll_tflop(config, num_classes: int, batch: int) -> float:
    """TFLOP of one trajectory-matching loss and its backward into the images and lr at this config's sizes, counted
    on the meta device (shapes only: nothing is computed). The decoder and the MMD term are not counted."""
    net = FlatModel(build_net(config.experts, config.data, num_classes, "meta"))
    start = flat_parameters(net.model)
    c, r = config.data.channels, config.data.resolution
    images = torch.zeros(config.distillation.syn_steps, batch, c, r, r, device="meta", requires_grad=True)
    labels = torch.zeros(batch, dtype=torch.long, device="meta")
    lr = torch.zeros((), device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        loss = trajectory_matching_loss(net, start, start, [(x, labels) for x in images], lr)
        loss.backward(inputs=[images, lr])
    return counter.get_total_flops() / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/configs/imagenet_64_ipc1.yaml")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--compile", action="store_true", help="compile_inner_step")
    parser.add_argument("--per_class", type=int, default=8, help="generated real images per class (MMD)")
    parser.add_argument("--classes", type=int, default=None, help="classes of the subtask; default the config's")
    parser.add_argument("--syn_batch_size", type=int, default=None, help="images per unrolled step; default all")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--cudnn_benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--sync_debug", action="store_true", help="count host syncs by source line (GPU only)")
    parser.add_argument("--json_out", default=None, help="append the result to this file as one JSON line")
    parser.add_argument("--profile", default=None, help="write torch.profiler's operator table to this file")
    args = parser.parse_args()

    overrides = ["--iterations", str(args.iterations), "--compile_inner_step", str(args.compile),
                 "--checkpoint_every", str(10**9)]
    if args.syn_batch_size:
        overrides += ["--syn_batch_size", str(args.syn_batch_size)]
    config = parse_config(["--config", args.config, *overrides])  # as recipes/distill.py reads it
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    class_ids = plan_subtasks(list(range(args.num_classes)), config.run.num_subtasks)[0][:args.classes]
    names = [str(c) for c in range(args.num_classes)]
    torch.manual_seed(0)
    store = build_latent_store(config.representation, class_ids, names).to(device)
    decoder = build_decoder(config.representation, config.data).to(device)
    expert = build_net(config.experts, config.data, len(class_ids), device)
    start = flat_parameters(expert)
    epochs = config.distillation.max_start_epoch + config.distillation.expert_epochs + 1
    trajectory = torch.stack([start + 0.01 * e * torch.randn_like(start) for e in range(epochs)])
    c, r = config.data.channels, config.data.resolution
    data = RealImages(torch.rand(len(class_ids) * args.per_class, c, r, r, device=device),
                       torch.arange(len(class_ids), device=device).repeat_interleave(args.per_class), class_ids)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    marks = [time.perf_counter()]

    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    profiler = torch.profiler.profile(activities=activities) if args.profile else None

    def mark(iteration: int, losses: dict[str, float]) -> None:  # called after each iteration (log_every=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        if profiler is not None and iteration == 1:  # the first iteration's one-off set-up stays out
            profiler.start()

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.mixed_precision == "bf16"
                else full_precision(device))
    recorder = warnings.catch_warnings(record=True) if args.sync_debug else contextlib.nullcontext([])
    with autocast, recorder as caught:
        if args.sync_debug:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        stats = distill_subtask(store, decoder, data, [(expert, trajectory)], config.distillation,
                                torch.Generator().manual_seed(0), on_log=mark, log_every=1)
    if args.sync_debug:
        torch.cuda.set_sync_debug_mode("default")
    if profiler is not None:
        profiler.stop()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        with open(args.profile, "w") as f:
            f.write(profiler.key_averages().table(sort_by=sort, row_limit=40))
    syncs = Counter(f"{_short(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    steady = marks[-1] - marks[1] if len(marks) > 2 else float("nan")
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    batch = config.distillation.syn_batch_size or store.num_components  # images per unrolled step
    result = {
        "config": args.config, "device": str(device), "device_name": (torch.cuda.get_device_name(device)
                                                                     if device.type == "cuda" else "cpu"),
        "mixed_precision": args.mixed_precision, "compile_inner_step": args.compile,
        "cudnn_benchmark": args.cudnn_benchmark, "classes": len(class_ids),
        "components": store.num_components, "syn_batch_size": batch, "iterations": stats.iterations_run,
        "first_iteration_s": round(marks[1] - marks[0], 3),
        "iterations_per_second": round((len(marks) - 2) / steady, 4) if len(marks) > 2 else None,
        "peak_memory_gib": round(peak / 2**30, 3),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS",
        "last_losses": {k: v[-1] for k, v in stats.loss_history.items() if v},
        "torch": torch.__version__,
        "unroll_tflop_per_iteration": round(unroll_tflop(config, len(class_ids), batch), 3),
    }
    if result["iterations_per_second"]:
        result["unroll_tflop_per_s"] = round(result["unroll_tflop_per_iteration"] * result["iterations_per_second"], 2)
    if args.sync_debug:
        result["host_syncs_by_line"] = dict(syncs.most_common())
    print(f"{args.config}: {result['iterations_per_second']} iterations/s after the first "
          f"({result['first_iteration_s']} s), peak memory {result['peak_memory_gib']} GiB "
          f"({result['peak_memory_kind']}), {result['components']} components")
    print(json.dumps(result))
    setting_keys = ("config", "device", "device_name", "mixed_precision", "compile_inner_step", "cudnn_benchmark",
                    "classes", "components", "syn_batch_size", "iterations", "torch")
    save_record("gpu_smoke", {k: result[k] for k in setting_keys if k in result},
                {k: v for k, v in result.items() if k not in setting_keys})
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
