"""Issue 4 benchmark: K=2 subtasks on 2 processes x 1 thread against 1 process x 1 thread doing the same work.

    python benchmarks/federated_speedup.py [--iterations 30] [--spare_rank]

Prints the wall time of the distillation phase (data, experts, distillation, gather) of each, the speedup,
and the peak memory of every rank. `--spare_rank` runs K=1 subtask with 2 experts instead, so the second
process has no subtask and can only help with the experts; it also prints each rank's expert-training time.
Check that the machine is otherwise idle (/proc/pressure/cpu) first.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from record import save_record  # this folder is on sys.path when the script runs

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--num_subtasks", "2", "--max_train_per_class", "300", "--net_width", "32", "--num_experts", "1",
            "--trajectory_epochs", "7", "--teacher_epochs", "1", "--eval_steps", "20", "--eval_seeds", "1",
            "--init", "random", "--max_test_examples", "1000",
            "--storage_budget_ipc", "100"]  # two decoders: twice the demo's storage


def run(processes: int, output_dir: str, iterations: int, spare_rank: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_TOP_PAD_": "1073741824"}
    args = ["--config", str(ROOT / "recipes/configs/fashion_mnist.yaml"), "--output_dir", output_dir,
            "--iterations", str(iterations), *SETTINGS,
            *(["--num_subtasks", "1", "--num_experts", "2", "--storage_budget_ipc", "10"] if spare_rank else [])]
    if processes == 1:
        command = [sys.executable, str(ROOT / "recipes/distill.py"), *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(ROOT / "recipes/distill.py"), *args]
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads((Path(output_dir) / "metrics.json").read_text())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--spare_rank", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: run(n, f"{tmp}/p{n}", args.iterations, args.spare_rank) for n in (1, 2)}
    for n, m in results.items():
        memory = ", ".join(f"subtask {s['subtask']}: {s['peak_memory_bytes'] / 2**20:.0f} MiB" for s in m["subtasks"])
        print(f"{n} process(es) x 1 thread: distillation phase {m['distill_wall_time_s']:.1f} s, "
              f"peak memory per rank ({memory}), world size {m['num_processes']}")
        for r in m["experts_per_rank"]:
            print(f"  rank {r['rank']} trained experts (subtask, expert) {r['experts']} in {r['wall_time_s']:.1f} s")
    speedup = results[1]["distill_wall_time_s"] / results[2]["distill_wall_time_s"]
    print(f"speedup 2 processes vs 1: {speedup:.2f}x")
    save_record("federated_speedup", {"iterations": args.iterations, "spare_rank": args.spare_rank},
                {"speedup": speedup, **{f"{n}_processes": {key: m[key] for key in
                                                            ("distill_wall_time_s", "experts_per_rank", "subtasks")}
                                        for n, m in results.items()}})


if __name__ == "__main__":
    main()
