"""Federated distillation at many classes (issue 35): K=1 against K subtasks at one budget in accuracy, and the K
subtasks on 1 process against 2 in wall time, on the curve's protocol (`benchmarks/accuracy_vs_storage.py`).

    python benchmarks/federated_many_classes.py --output_dir outputs/curve [--dataset tiny_imagenet] [--budget 2]
        [--num_subtasks 4] [--seeds 3] [--runs k1 k4-p1 k4-p2] [any D3Config override, as the curve takes them]

Runs, in `<out>/<dataset>/federated<B>/`, each `recipes/distill.py` with `--storage_budget_ipc B` and the curve's
hard-label weight for B:
- `k1`: one subtask, its stages in the curve's `<out>/<dataset>/shared`: the curve's own D3 row at B (reused where
  the curve ran it).
- `k<K>-p1` and `k<K>-p2`: K subtasks (a decoder each, the budget shared) on 1 process, then on 2 (accelerate
  launch, gloo, one thread each), each in a stage folder of its own where only the curve's teacher is linked, so
  each trains its experts and distils its subtasks from nothing and `distill_wall_time_s` (data, experts,
  distillation, gather) times the whole of that work. The 2-process run trains 1 student (its pipeline is compared
  with the 1-process run's, tensor by tensor: a subtask's seed does not depend on the process count).
A finished run (its `metrics.json`, made by the same command: `benchmark_args.json`) is kept, so a rerun continues
with the next; a timing run that did not finish restarts from an empty stage folder, since the time of a resumed
run is not the time of the work. Pin nothing: the
2-process run needs both cores, and the machine otherwise idle (/proc/pressure/cpu).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from accuracy_vs_storage import CONFIGS, base_config, prepare_shared
from record import save_record  # this folder is on sys.path when the script runs
from safetensors.torch import load_file

from hf_d3.config_parser import parse_config
from hf_d3.data import load_split
from hf_d3.teacher import hard_label_weight_for

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/distill.py"


def distill(command_args: list[str], processes: int, threads_env: dict) -> None:
    """recipes/distill.py with `command_args` on `processes` processes of one thread each."""
    if processes == 1:
        command = [sys.executable, str(RECIPE), *command_args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(RECIPE), *command_args]
    subprocess.run(command, env={**os.environ, **threads_env}, check=True)


def fresh_stage_dir(stage_dir: Path, shared: Path) -> None:
    """An empty stage folder but for the curve's teacher (every run of the dataset relabels with it)."""
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    (stage_dir / "teacher").symlink_to((shared / "teacher").resolve(), target_is_directory=True)


def same_pipeline(run: Path, other: Path) -> bool:
    """Whether two run folders saved the same pipeline tensors (every safetensors file, every tensor equal)."""
    files = sorted(p.relative_to(run) for p in run.rglob("*.safetensors"))
    if files != sorted(p.relative_to(other) for p in other.rglob("*.safetensors")):
        return False
    for name in files:
        a, b = load_file(run / name), load_file(other / name)
        if a.keys() != b.keys() or any(not a[k].equal(b[k]) for k in a):
            return False
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True, help="the curve's output folder")
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="tiny_imagenet")
    parser.add_argument("--data_path", type=Path, default=None, help="as the curve's")
    parser.add_argument("--budget", type=float, default=2, help="IPC-equivalent, in values")
    parser.add_argument("--num_subtasks", type=int, default=4, help="K of the federated runs (at least 2)")
    parser.add_argument("--seeds", type=int, default=3, help="students of the K=1 and K-subtask 1-process runs")
    parser.add_argument("--runs", nargs="+", default=None, metavar="NAME",
                        help="make only these runs (k1, k<K>-p1, k<K>-p2; default all), e.g. k1 on one core beside "
                             "k<K>-p1 on the other; the records are written once all three have finished")
    args, overrides = parser.parse_known_args()
    if args.num_subtasks < 2:
        parser.error(f"--num_subtasks {args.num_subtasks}: the federated runs need at least 2")
    k = args.num_subtasks
    names = ["k1", f"k{k}-p1", f"k{k}-p2"]
    if unknown := sorted(set(args.runs or []) - set(names)):
        parser.error(f"--runs {' '.join(unknown)}: the runs are {', '.join(names)}")

    out = args.output_dir / args.dataset
    config_path = base_config(args.dataset, args.data_path, out)
    config = parse_config(["--config", str(config_path), *overrides, "--output_dir", str(out / "shared")])
    prepare_shared(config, load_split(config.data, config.data.train_split))
    shared, folder = out / "shared", out / f"federated{args.budget:g}"
    weight = config.relabel.hard_label_weight  # as the curve: the budget's unless the command line sets one
    weight = hard_label_weight_for(args.budget) if weight is None else weight
    common = ["--config", str(config_path), *overrides, "--storage_budget_ipc", str(args.budget), "--hard_label_weight",
              str(weight)]
    one_thread = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    runs = dict(zip(names, (  # name: (subtasks, processes, students, stage folder, fresh: timed from nothing)
        (1, 1, args.seeds, shared, False),
        (k, 1, args.seeds, folder / f"k{k}-p1-stages", True),
        (k, 2, 1, folder / f"k{k}-p2-stages", True),
    ), strict=True))
    metrics = {}
    for name, (subtasks, processes, seeds, stage_dir, fresh) in runs.items():
        run, command = folder / name, [*common, "--num_subtasks", str(subtasks), "--output_dir", str(folder / name),
                                       "--stage_dir", str(stage_dir), "--eval_seeds", str(seeds)]
        made_by = run / "benchmark_args.json"
        if not ((run / "metrics.json").is_file() and made_by.is_file()
                and json.loads(made_by.read_text()) == [processes, *command]):
            if args.runs is not None and name not in args.runs:
                continue
            if fresh:
                fresh_stage_dir(stage_dir, shared)
            distill(command, processes, one_thread)
            made_by.write_text(json.dumps([processes, *command]))
        metrics[name] = json.loads((run / "metrics.json").read_text())
    if len(metrics) < len(runs):
        print(f"finished: {', '.join(metrics) or 'none'}; to come: {', '.join(sorted(set(runs) - set(metrics)))}")
        return

    same = same_pipeline(folder / f"k{k}-p1", folder / f"k{k}-p2")
    base = {"dataset": args.dataset, "budget": args.budget, "unit": "values", "hard_label_weight": weight,
            "overrides": overrides}
    for name, (subtasks, processes, *_rest) in runs.items():
        m = metrics[name]
        figures = {"accuracies": m["accuracies"], "ipc_equivalent": m["storage"]["ipc_equivalent"],
                   "distill_wall_time_s": m["distill_wall_time_s"],
                   "peak_memory_gib_per_subtask": [round(s["peak_memory_bytes"] / 2**30, 2) for s in m["subtasks"]],
                   "experts_per_rank": m["experts_per_rank"]}
        if processes == 2:
            figures["speedup"] = metrics[f"k{k}-p1"]["distill_wall_time_s"] / m["distill_wall_time_s"]
            figures["same_pipeline_as_1_process"] = same
        save_record("federated_many_classes", {**base, "num_subtasks": subtasks, "processes": processes,
                                               "timed_from_nothing": runs[name][4]}, figures)
        accuracy = sum(m["accuracies"]) / len(m["accuracies"])
        print(f"{name}: K={subtasks}, {processes} process(es): accuracy {100 * accuracy:.2f} % "
              f"({len(m['accuracies'])} students), distillation phase {m['distill_wall_time_s']:.0f} s, peak per "
              f"subtask {figures['peak_memory_gib_per_subtask']} GiB")
    p1, p2 = metrics[f"k{k}-p1"], metrics[f"k{k}-p2"]
    print(f"speedup of 2 processes: {p1['distill_wall_time_s'] / p2['distill_wall_time_s']:.2f}x; the same "
          f"pipeline on 1 and 2 processes: {same}")


if __name__ == "__main__":
    main()
