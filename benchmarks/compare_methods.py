"""Issue 3 benchmark: D3 beside its ablations and beside real images at the same storage, in one run.

    python benchmarks/compare_methods.py --config recipes/configs/fashion_mnist.yaml \
        --output_dir outputs/compare/fashion_mnist_ipc10 [--ablations] [--variant "NAME=D3 ARGS" ...] \
        [any D3Config override, e.g. --iterations 100]

1. D3, both terms: `recipes/distill.py` with the config, in its own process (its peak memory is its own).
2. With `--ablations`, for the same distillation time as (1) (`max_distill_time_s`), reusing its experts and
   teacher: MMD only, trajectory matching only, and the warm start alone (`iterations 0`); each `--variant`
   is one more such row (one that sets its own `--iterations` runs those, e.g. a warm start alone with other
   sizes). A row lives in `<output_dir>/<its name, lower case, non-alphanumerics as _>`.
3. R+H and R+S: the most real images per class whose images and labels fit in (1)'s stored values (a row
   that stores enough more for them to get more images is marked "over the R+H / R+S storage"). R+S is
   labelled by the run's teacher at the temperature whose student scores best on held-out training images
   (10 % of the training split, never among the R+H / R+S images). `--teacher` reuses a trained teacher.
Every student uses the config's evaluation settings (architecture, optimiser steps, seeds). Prints a Markdown
table and writes `<output_dir>/results.json`; finished D3 runs in `<output_dir>` are reused, and so are the
R+H / R+S rows and held-out accuracies (per temperature) of an earlier `results.json` there when the data,
teacher, budget, student settings and torch's thread count match, so adding a temperature trains only its
held-out student (and the R+S row, if it wins).
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from record import save_record  # this folder is on sys.path when the script runs
from transformers import AutoModelForImageClassification

import hf_d3  # noqa: F401  (registers the classifiers with the Auto classes)
from hf_d3.baselines import choose_temperature, random_real_sampler, split_held_out
from hf_d3.config_parser import parse_config
from hf_d3.data import load_images, load_split, load_test_images
from hf_d3.evaluation import evaluate_with_config
from hf_d3.stages import teacher_stage
from hf_d3.storage import largest_ipc_within, prototype_storage

ROOT = Path(__file__).resolve().parents[1]
# name: D3 arguments; a row that sets no --iterations runs for the main run's distillation time
ABLATIONS = {"D3, MMD only": ["--mtt_weight", "0"],
             "D3, trajectory matching only": ["--mmd_weight", "0"],
             "D3, warm start only": ["--iterations", "0"]}

# The settings R+H / R+S depend on (with the D3 run's budget and the temperatures tried).
BASELINE_SETTINGS = ("dataset", "train_split", "test_split", "max_test_examples", "image_column", "label_column",
                     "resolution", "channels", "seed", "teacher", "eval_architecture", "eval_steps", "eval_batch_size",
                     "eval_lr", "eval_seeds", "eval_augment", "net_width", "net_depth")


def distill(args: list[str], output_dir: Path, stage_dir: Path) -> dict:
    """A D3 run of `recipes/distill.py`; the runs share `stage_dir`, so each reuses the experts, teacher and
    subtasks of the others' settings (`hf_d3.stages`)."""
    if not (output_dir / "metrics.json").is_file():
        command = [sys.executable, str(ROOT / "recipes" / "distill.py"), *args, "--output_dir", str(output_dir),
                   "--stage_dir", str(stage_dir)]
        subprocess.run(command, check=True)
    return json.loads((output_dir / "metrics.json").read_text())


def teacher_of(config, stage_dir: Path) -> str:
    """The runs' relabelling teacher: the config's, else the one their shared teacher stage holds."""
    if config.relabel.teacher:
        return config.relabel.teacher
    return str(teacher_stage(config, config.run.mixed_precision or "no").folder(stage_dir))


def d3_row(metrics: dict) -> dict:
    subtasks = metrics["subtasks"]
    return {"values": metrics["storage"]["total_values"], "ipc_equivalent": metrics["storage"]["ipc_equivalent"],
            "accuracies": metrics["accuracies"], "iterations": [s["iterations_run"] for s in subtasks],
            "distill_wall_time_s": [s["distill_wall_time_s"] for s in subtasks],
            "peak_memory_gib": [s["peak_memory_bytes"] / 2**30 for s in subtasks]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="another D3 row at equal distillation time, e.g. 'D3, small batch=--syn_batch_size 20'")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    args, d3_args = parser.parse_known_args()
    if any("=" not in variant for variant in args.variant):
        parser.error(f"--variant takes NAME=ARGS, e.g. 'D3, small batch=--syn_batch_size 20'; got {args.variant}")
    config = parse_config(d3_args)
    out = args.output_dir
    rows = {}

    main_run = distill(d3_args, out / "d3", out / "stages")
    rows["D3 (MTT + MMD)"] = d3_row(main_run)
    equal_time = max(s["iterations_wall_time_s"] for s in main_run["subtasks"])
    runs = (ABLATIONS if args.ablations else {}) | {name: shlex.split(extra) for name, extra in
                                                   (variant.split("=", 1) for variant in args.variant)}
    for name, extra in runs.items():
        if not any(arg == "--iterations" or arg.startswith("--iterations=") for arg in extra):
            extra = [*extra, "--iterations", "1000000", "--max_distill_time_s", f"{equal_time:.1f}"]
        folder = out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        rows[name] = d3_row(distill([*d3_args, *extra], folder, out / "stages"))

    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    if (previous and all(previous["config"].get(key) == config.to_dict()[key] for key in BASELINE_SETTINGS)
            and previous["rows"]["D3 (MTT + MMD)"]["values"] == main_run["storage"]["total_values"]
            and previous.get("num_threads") == torch.get_num_threads()):
        # same data, teacher, budget, students and thread count: R+H / R+S would come out identical (they are
        # deterministic, but only at a fixed thread count: R+H's first student differs by 0.3 points from 1 to 2),
        # so only temperatures and rows not in the earlier run are trained
        done = {"held_out": previous["r_s_held_out_accuracy_by_temperature"],
                "rows": {name: row for name, row in previous["rows"].items() if name.startswith("R+")}}
    else:
        done = {"held_out": {}, "rows": {}}
    held_out_accuracy = real_image_rows(config, out, main_run, args.temperatures, rows, done)
    report(config, out, rows, held_out_accuracy, main_run["storage"], main_run.get("teacher_accuracy"))


def real_image_rows(config, out: Path, main_run: dict, temperatures: list[float], rows: dict, done: dict) -> dict:
    """Add the R+H and R+S rows at the D3 run's budget; returns R+S held-out accuracy by temperature.

    `done` holds an earlier run's held-out accuracies ("held_out", by temperature) and rows ("rows", by name)
    at the same settings; those are reused, not trained again."""
    data, seed = config.data, config.run.seed
    columns = {"image_column": data.image_column, "label_column": data.label_column}
    train = load_images(load_split(data, data.train_split), data.resolution, data.channels, **columns)
    test = load_test_images(data)  # the D3 run's test images (its max_test_examples too)
    held_out, pool = split_held_out(len(train.labels), seed)
    pool = train.subset(pool)
    teacher = AutoModelForImageClassification.from_pretrained(teacher_of(config, out / "stages"))
    n, per_image = len(train.class_names), main_run["storage"]["values_per_image"]
    budget = main_run["storage"]["total_values"]

    def real(ipc, temperature=None):
        return random_real_sampler(pool.images, pool.labels, n, ipc, seed=seed,
                                   teacher=None if temperature is None else teacher, temperature=temperature or 1.0)

    def held_out_score(sampler) -> float:
        return evaluate_with_config(config.evaluation, config.experts, sampler, train.images[held_out],
                                    train.labels[held_out], n, seeds=1).accuracy_mean

    ipc_hard = largest_ipc_within(budget, n, per_image, soft_labels=False)
    ipc_soft = largest_ipc_within(budget, n, per_image, soft_labels=True)
    best, held_out_accuracy = choose_temperature(lambda t: held_out_score(real(ipc_soft, t)), temperatures,
                                                 done["held_out"])
    for name, ipc, temperature in ((f"R+H ({ipc_hard} img/class)", ipc_hard, None),
                                   (f"R+S ({ipc_soft} img/class, T={best:g})", ipc_soft, best)):
        if name in done["rows"]:
            rows[name] = done["rows"][name]
            continue
        m = evaluate_with_config(config.evaluation, config.experts, real(ipc, temperature), test.images, test.labels, n)
        values = prototype_storage(n, ipc, per_image, soft_labels=temperature is not None)
        rows[name] = {"values": values, "ipc_equivalent": values / (n * per_image), "accuracies": m.accuracies}
    return held_out_accuracy


def report(config, out: Path, rows: dict, held_out_accuracy: dict, storage: dict,
           teacher_accuracy: float | None) -> None:
    # R+H / R+S are sized to the main D3 row; a variant storing enough more that they would get more images
    # is not at their storage, and says so
    budget, n, per_image = storage["total_values"], storage["num_classes"], storage["values_per_image"]
    for row in rows.values():
        if "iterations" in row:
            row["over_baseline_storage"] = any(
                largest_ipc_within(row["values"], n, per_image, soft) > largest_ipc_within(budget, n, per_image, soft)
                for soft in (False, True))
    results = {"config": config.to_dict(), "rows": rows, "r_s_held_out_accuracy_by_temperature": held_out_accuracy,
               "teacher_accuracy": teacher_accuracy, "num_threads": torch.get_num_threads()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for name, row in rows.items():
        figures = {**row, "teacher_accuracy": teacher_accuracy}
        if name.startswith("R+S"):
            figures["held_out_accuracy_by_temperature"] = held_out_accuracy
        save_record("compare_methods", {"dataset": config.data.dataset, "budget_values": budget, "method": name,
                                        "config": config.to_dict()}, figures)
    students = config.evaluation
    print(f"\n{config.data.dataset}, budget {budget:,} values; students: {students.eval_architecture} width "
          f"{config.experts.net_width}, {students.eval_steps} steps, {students.eval_seeds} seeds, final step, "
          "test split")
    if teacher_accuracy is not None:  # runs older than the field lack it
        print(f"relabelling teacher's test accuracy: {100 * teacher_accuracy:.2f} %")
    print("R+S temperature on held-out training images: "
          + ", ".join(f"T={float(t):g} {100 * a:.2f} %" for t, a in held_out_accuracy.items()))
    print("| method | stored values | IPC-eq | iterations | distillation wall time | peak memory | test accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        acc = torch.tensor(row["accuracies"]) * 100
        std = acc.std().item() if len(acc) > 1 else 0.0
        extra = ("-", "-", "-") if "iterations" not in row else (
            "/".join(map(str, row["iterations"])), "/".join(f"{t:.0f} s" for t in row["distill_wall_time_s"]),
            "/".join(f"{g:.2f} GiB" for g in row["peak_memory_gib"]))
        name += " (over the R+H / R+S storage)" if row.get("over_baseline_storage") else ""
        print(f"| {name} | {row['values']:,} | {row['ipc_equivalent']:.2f} | {' | '.join(extra)} | "
              f"{acc.mean():.2f} +- {std:.2f} % |")


if __name__ == "__main__":
    main()
