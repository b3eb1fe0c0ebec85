"""The paper's network on Tiny ImageNet on one GPU, shortened to fit one 10-minute device run: D3 at 1 and 2
IPC-equivalent beside R+S (random real images with the teacher's soft labels), every figure from one command.

    python benchmarks/gpu_tinyimagenet.py --data outputs/gpu_tinyimagenet/subset \
        --output_dir outputs/gpu_tinyimagenet/run [--budgets 1 2] [--temperatures 1 2 4 8] \
        [--results_dir DIR] [any D3Config override, e.g. --iterations 50]

The data: a subset of the local Tiny ImageNet that travels to a device machine (`benchmarks/tinyimagenet_subset.py`).
The protocol: `recipes/configs/tinyimagenet_ipc1.yaml` (64x64, ConvNet-D4 width 128, soft labels alone) without its
sizes, so `--storage_budget_ipc B` chooses them, as the curve does (`benchmarks/accuracy_vs_storage.py`), with every
phase cut short (`SHORTENED`); the command line overrides both (a CPU check shrinks the networks and phases).
1. D3 at each budget: `recipes/distill.py` in its own process, all runs on one `--stage_dir`, so the experts and the
   teacher are trained once; a rerun reuses every finished stage of its settings and continues a cut subtask from
   its checkpoint (`hf_d3.stages`), so a cut script is rerun as it was.
2. R+S at each budget: the most real images per class whose pixels and soft labels fit in the whole budget (at least
   one; more than the budget is marked `over_budget`), at the temperature whose student scores best on held-out
   training images (`hf_d3.baselines`), students as D3's; a row is kept in `<output_dir>` and reused while its
   settings hold (two budgets that fit as many images share one).
3. The trajectory-matching step alone at the run's sizes (one loss and its backward into the images and lr, expert
   weights random: the work does not depend on them), timed on the device; its floating-point operations are counted
   on the meta device (`gpu_smoke.unroll_tflop`) and set against the card's measured matrix-product rates, in float32
   and TF32 (the unroll runs in float32; cuDNN's convolutions may use TF32, PyTorch's default).
Prints test accuracy, iterations per second, peak GPU memory and that rate; writes one record (`record.save_record`,
benchmark "gpu_tinyimagenet") into `--results_dir` (default benchmarks/results).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from compare_methods import teacher_of  # this folder is on sys.path when the script runs
from gpu_smoke import unroll_tflop
from record import RESULTS, save_record
from transformers import AutoModelForImageClassification

import hf_d3  # noqa: F401  (registers the classifiers with the Auto classes)
from hf_d3.baselines import choose_temperature, random_real_sampler, split_held_out
from hf_d3.config import PAPER_SIZES
from hf_d3.config_parser import parse_config
from hf_d3.data import class_names_of, load_images, load_split, load_test_images
from hf_d3.distill import FlatModel, trajectory_matching_loss
from hf_d3.evaluation import evaluate_with_config
from hf_d3.experts import flat_parameters
from hf_d3.factories import build_net
from hf_d3.real_images import RealImages
from hf_d3.storage import largest_ipc_within, prototype_storage

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "recipes/configs/tinyimagenet_ipc1.yaml"
# The paper's phases cut to fit one device run of 10 minutes with the data of tinyimagenet_subset.py (docs/gpu.md
# says how the time was estimated); checkpoints every 20 iterations, so a cut run loses little.
SHORTENED = {"num_experts": 3, "trajectory_epochs": 6, "max_start_epoch": 3, "expert_epochs": 2, "teacher_epochs": 10,
             "init": "real", "init_steps": 200, "iterations": 60, "syn_batch_size": 100, "mmd_samples_per_class": 20,
             "checkpoint_every": 20, "eval_steps": 300, "eval_seeds": 2}


def base_config(data: Path, out: Path) -> Path:
    """The protocol's config without its sizes, on `data` (test split `test`), shortened; written to `out`."""
    values = {k: v for k, v in yaml.safe_load(PROTOCOL.read_text()).items() if k not in PAPER_SIZES}
    values |= {"dataset": str(data.resolve()), "test_split": "test", **SHORTENED}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "base.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(work, device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """The median wall time of `work()` over `repeats` runs after `warmup` (the device synchronised around each)."""
    times = []
    for i in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_tflop_per_s(device: torch.device, size: int, tf32: bool) -> float:
    """A `size`-cubed float32 matrix product's rate on random data, TF32 allowed or not: the card's ceiling."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        return 2 * size**3 / median_seconds(lambda: a @ b, device) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def unroll_figures(config, num_classes: int, device: torch.device) -> dict:
    """The trajectory-matching step alone at the run's sizes: its time, TFLOP, rate and peak memory, beside the
    card's matrix-product rates."""
    batch, steps = config.distillation.syn_batch_size, config.distillation.syn_steps
    c, r = config.data.channels, config.data.resolution
    torch.manual_seed(0)
    net = FlatModel(build_net(config.experts, config.data, num_classes, device))
    start = flat_parameters(net.model)
    target = start + 0.01 * torch.randn_like(start)
    images = torch.rand(steps, batch, c, r, r, device=device, requires_grad=True)
    labels = torch.randint(num_classes, (batch,), device=device)
    lr = torch.tensor(config.distillation.syn_lr_init, device=device, requires_grad=True)

    def step():
        trajectory_matching_loss(net, start, target, [(x, labels) for x in images], lr).backward(inputs=[images, lr])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_seconds(step, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    tflop = unroll_tflop(config, num_classes, batch)
    size = 8192 if device.type == "cuda" else 1024  # a CPU check needs only a figure, fast
    return {"images_per_step": batch, "steps": steps, "seconds": round(seconds, 4), "tflop": round(tflop, 4),
            "tflop_per_s": round(tflop / seconds, 3), "peak_memory_gib": peak and round(peak, 2),
            "card_matmul_tflop_per_s": {"float32": round(matmul_tflop_per_s(device, size, False), 3),
                                        "tf32": round(matmul_tflop_per_s(device, size, True), 3)}}


def distill(config_path: Path, overrides: list[str], budget: float, out: Path) -> Path:
    """D3 at `budget` by `recipes/distill.py`, in `out/d3_ipc<budget>`, its stages in `out/stages`."""
    run = out / f"d3_ipc{budget:g}"
    subprocess.run([sys.executable, str(ROOT / "recipes/distill.py"), "--config", str(config_path), *overrides,
                    "--storage_budget_ipc", f"{budget:g}", "--output_dir", str(run),
                    "--stage_dir", str(out / "stages")], check=True)
    return run


def d3_row(run: Path) -> dict:
    """A finished D3 run's figures: accuracy, the sizes the budget chose, speed and peak memory."""
    metrics, chosen = (json.loads((run / name).read_text()) for name in ("metrics.json", "config.json"))
    subtasks = metrics["subtasks"]
    return {"accuracies": metrics["accuracies"], "ipc_equivalent": metrics["storage"]["ipc_equivalent"],
            "sizes": {k: chosen[k] for k in PAPER_SIZES},
            "teacher_accuracy": metrics["teacher_accuracy"],
            "iterations": sum(s["iterations_run"] for s in subtasks),
            "iterations_per_second": round(sum(s["iterations_run"] for s in subtasks)
                                           / sum(s["iterations_wall_time_s"] for s in subtasks), 3),
            "warm_start_s": round(sum(s["warm_start_wall_time_s"] for s in subtasks), 1),
            "peak_memory_gib": round(max(s["peak_memory_bytes"] for s in subtasks) / 2**30, 2),
            "wall_time_s": round(metrics["total_wall_time_s"], 1)}


def r_plus_s_rows(config, settings: dict, out: Path, budgets: list[float], device: torch.device) -> dict:
    """R+S at each budget; a row is kept in `out/r_plus_s_ipc<k>.json` with the `settings` it was computed under
    (but the budget list: a row is one budget's, so a rerun with another list keeps it)."""
    settings = {k: v for k, v in settings.items() if k != "budgets"}
    data, seed = config.data, config.run.seed
    train = load_images(load_split(data, data.train_split), data.resolution, data.channels,
                        image_column=data.image_column, label_column=data.label_column)
    test = load_test_images(data)
    n, per_image = len(test.class_names), test.images[0].numel()
    held_out, pool = split_held_out(len(train.labels), seed)
    pool = train.subset(pool)
    pool = RealImages(pool.images.to(device), pool.labels, pool.class_ids, pool.class_names)
    held_out_images, held_out_labels = train.images[held_out].to(device), train.labels[held_out].to(device)
    test_images, test_labels = test.images.to(device), test.labels.to(device)
    teacher = AutoModelForImageClassification.from_pretrained(teacher_of(config, out / "stages")).to(device)

    def held_out_score(sampler) -> float:
        return evaluate_with_config(config.evaluation, config.experts, sampler, held_out_images, held_out_labels, n,
                                    seeds=1).accuracy_mean

    rows = {}
    for budget in budgets:
        fitting = largest_ipc_within(int(budget * n * per_image), n, per_image, soft_labels=True)
        ipc = max(fitting, 1)
        path = out / f"r_plus_s_ipc{ipc}.json"
        if not path.is_file() or json.loads(path.read_text())["settings"] != settings:
            start = time.perf_counter()
            best, scores = choose_temperature(lambda t, ipc=ipc: held_out_score(random_real_sampler(
                pool.images, pool.labels, n, ipc, seed, teacher, t)), settings["temperatures"])
            sampler = random_real_sampler(pool.images, pool.labels, n, ipc, seed, teacher, best)
            accuracies = evaluate_with_config(config.evaluation, config.experts, sampler, test_images, test_labels,
                                              n).accuracies
            values = prototype_storage(n, ipc, per_image, soft_labels=True)
            path.write_text(json.dumps({"settings": settings, "row": {
                "accuracies": accuracies, "ipc_equivalent": values / (n * per_image), "images_per_class": ipc,
                "temperature": best, "held_out_accuracy_by_temperature": scores,
                "wall_time_s": round(time.perf_counter() - start, 1)}}, indent=2))
        rows[f"{budget:g}"] = {**json.loads(path.read_text())["row"], "over_budget": fitting == 0}
    return rows


def mean(values: list[float]) -> float:
    return 100 * sum(values) / len(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "outputs/gpu_tinyimagenet/subset")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs/gpu_tinyimagenet/run")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--results_dir", type=Path, default=RESULTS)
    args, overrides = parser.parse_known_args()
    started = time.perf_counter()
    out = args.output_dir
    config_path = base_config(args.data, out)
    config = parse_config(["--config", str(config_path), *overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bookkeeping (the data is named relative to the repository) and the sizes, which each budget chooses, left out
    left_out = {"dataset", "output_dir", "stage_dir", "sizes", "storage_budget_ipc", *PAPER_SIZES}
    settings = {"data": os.path.relpath(args.data.resolve(), ROOT), "budgets": args.budgets,
                "temperatures": args.temperatures,
                "config": {k: v for k, v in config.to_dict().items() if k not in left_out},
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__}

    d3 = {}
    for budget in args.budgets:
        d3[f"{budget:g}"] = d3_row(distill(config_path, overrides, budget, out))
        print(f"D3 at {budget:g}: {json.dumps(d3[f'{budget:g}'])}", flush=True)
    r_plus_s = r_plus_s_rows(config, json.loads(json.dumps(settings)), out, args.budgets, device)
    # this process's peak: R+S's students, held-out and test images (the D3 runs' are in their rows)
    r_plus_s_peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    unroll = unroll_figures(config, len(class_names_of(config.data)), device)
    figures = {"d3": d3, "r_plus_s": r_plus_s, "r_plus_s_peak_memory_gib": r_plus_s_peak, "unroll": unroll,
               "wall_time_s": round(time.perf_counter() - started)}
    save_record("gpu_tinyimagenet", settings, figures, results=args.results_dir)
    print_summary(settings, figures)


def print_summary(settings: dict, figures: dict) -> None:
    d3, r_plus_s, unroll = figures["d3"], figures["r_plus_s"], figures["unroll"]
    print(f"\n{settings['device_name']}; {settings['data']}; whole script {figures['wall_time_s']} s")
    print(f"teacher's test accuracy: {100 * next(iter(d3.values()))['teacher_accuracy']:.2f} %")
    print("| budget | method | stored IPC-eq | test accuracy (%) | iterations/s | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for budget, row in d3.items():
        rs = r_plus_s[budget]
        print(f"| {budget} | D3 | {row['ipc_equivalent']:.2f} | {mean(row['accuracies']):.2f} | "
              f"{row['iterations_per_second']} | {row['peak_memory_gib']} |")
        print(f"| {budget} | R+S ({rs['images_per_class']} img/class, T={rs['temperature']:g}"
              f"{', over budget' if rs['over_budget'] else ''}) | {rs['ipc_equivalent']:.2f} | "
              f"{mean(rs['accuracies']):.2f} | - | {figures['r_plus_s_peak_memory_gib'] or '-'} |")
    rates = unroll["card_matmul_tflop_per_s"]
    print(f"trajectory-matching step ({unroll['steps']} steps x {unroll['images_per_step']} images): "
          f"{unroll['seconds']} s, {unroll['tflop']} TFLOP, {unroll['tflop_per_s']} TFLOP/s = "
          f"{100 * unroll['tflop_per_s'] / rates['float32']:.0f} % of the card's float32 matrix product "
          f"({rates['float32']} TFLOP/s), {100 * unroll['tflop_per_s'] / rates['tf32']:.0f} % of its TF32 "
          f"({rates['tf32']} TFLOP/s)")


if __name__ == "__main__":
    main()
