"""Issue 23 benchmark: peak resident memory per rank and time to the first expert step, old data path against new.

    export HF_HOME=outputs/data_path_bench/hf_home   # the same for both scripts: the stand-in's load_dataset cache
    python benchmarks/imagenet_stand_in.py --per_class 100 --output_dir outputs/data_path_bench/imagenet_100
    python benchmarks/imagenet_stand_in.py --per_class 300 --output_dir outputs/data_path_bench/imagenet_300
    git worktree add /tmp/old 4634833     # the data path before the image cache (to_tensors)
    python benchmarks/data_path.py \
        --stand_in outputs/data_path_bench/imagenet_100 outputs/data_path_bench/imagenet_300 \
        --old_src /tmp/old/src

For every stand-in and data path, runs the ImageNet-64 10 IPC recipe (`imagenet_64_ipc10.yaml`) with K=4 subtasks
on two gloo ranks (`accelerate launch --multi_gpu --num_processes 2`, one thread each), and stops every rank after
its `--steps`-th expert SGD step (`--steps 0`: as its first expert starts, before any step). Each rank reports,
from its process's start: the seconds to the start of its first expert (data loaded, network built) and to its first
expert step; its resident memory and peak resident memory
(`getrusage` maxrss: everything the process ever had resident, its own heap, the libraries and any memory-mapped file
pages it touched) at the start of its first expert, and the peak through the measured steps (which adds the expert's
activations: about 2.5 GB for a batch of 256 at 64x64 through ConvNet-D4 of width 128); and the peak of its child
processes (the new path's decoding workers). The new path runs twice per stand-in: cold (no image cache: rank 0
builds it while rank 1 waits) and warm (the cache of the cold run reused). `--old_src` is the `src` folder of a
checkout of the old code, put first on PYTHONPATH for its runs; the new code is this checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import save_record  # this folder is on sys.path when the script runs

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "configs" / "imagenet_64_ipc10.yaml"
OVERRIDES = ["--num_subtasks", "4", "--num_experts", "1", "--test_split", "test", "--eval_seeds", "1"]


def worker(result_dir: Path, steps: int, config_args: list[str]) -> None:
    """Run inside `accelerate launch`: the real run, stopped at the `steps`-th expert step of this rank."""
    import psutil
    import torch

    import hf_d3
    import hf_d3.experts
    from hf_d3.config_parser import parse_config
    from hf_d3.run import make_accelerator, run_distillation

    started = psutil.Process().create_time()
    first_step = None
    original_step = torch.optim.SGD.step
    calls = 0
    at_start = {}
    original_train = hf_d3.experts.train_classifier

    def report() -> None:
        rank = int(os.environ.get("RANK", "0"))
        (result_dir / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), **at_start,
            "time_to_first_expert_step_s": first_step, "steps": calls,
            "seconds_to_last_step": time.time() - started if calls else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            # which source ran, named without a path of the machine: this checkout's, or `--old_src`
            "hf_d3": "src/hf_d3" if Path(hf_d3.__file__).parent == ROOT / "src" / "hf_d3" else "--old_src"}))
        os._exit(0)  # the measurement is taken: nothing else of the run is needed

    def train_classifier(*args, **kwargs):  # entered with the expert's data loaded and its network built
        if not at_start:
            status = Path("/proc/self/status").read_text()  # resident memory by kind: own (anon) or file pages
            kinds = {k: int(v) / 1024 for k, v in re.findall(r"(Rss\w+):\s+(\d+) kB", status)}
            at_start.update(seconds_to_expert_start=time.time() - started,
                            rss_at_expert_start_mib=psutil.Process().memory_info().rss / 2**20,
                            rss_anon_at_expert_start_mib=kinds.get("RssAnon"),
                            rss_file_at_expert_start_mib=kinds.get("RssFile"),
                            peak_rss_at_expert_start_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            if steps == 0:
                report()
        return original_train(*args, **kwargs)

    hf_d3.experts.train_classifier = train_classifier

    def step(self, *args, **kwargs):  # the experts are the first users of SGD in a run
        nonlocal calls, first_step
        out = original_step(self, *args, **kwargs)
        calls += 1
        if calls == 1:
            first_step = time.time() - started
        if calls == steps:
            report()
        return out

    torch.optim.SGD.step = step
    config = parse_config(config_args)
    run_distillation(config, make_accelerator(config.run))
    raise SystemExit("the run finished without reaching the expert step to measure")


def launch(src: Path, stand_in: Path, cache: Path, steps: int, overrides: list[str]) -> dict:
    """One 2-rank run of the recipe on `stand_in` with the code in `src`; returns both ranks' figures."""
    with tempfile.TemporaryDirectory(prefix="data-path-") as tmp:
        results = Path(tmp) / "results"
        results.mkdir()
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
               "HF_D3_CACHE": str(cache), "MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_TOP_PAD_": "1073741824",
               "TQDM_DISABLE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__, "--worker",
                   str(results), "--steps", str(steps), "--", "--config", str(RECIPE), "--dataset", str(stand_in),
                   "--output_dir", str(Path(tmp) / "run"), *OVERRIDES, *overrides]
        start = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        ranks = [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]
        if done.returncode or len(ranks) != 2:
            return {"failed": True, "returncode": done.returncode, "wall_time_s": wall,
                    "stderr_tail": done.stderr[-3000:], "ranks": ranks}
        return {"failed": False, "wall_time_s": wall, "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stand_in", type=Path, nargs="+")
    parser.add_argument("--old_src", type=Path, default=Path("/tmp/old/src"))
    parser.add_argument("--paths", nargs="+", default=["old", "new"], choices=["old", "new"])
    parser.add_argument("--steps", type=int, default=2,
                        help="expert steps before each rank is measured (0: as its first expert starts)")
    parser.add_argument("--cache_dir", type=Path, default=ROOT / "outputs" / "data_path_bench" / "hf_d3_cache")
    parser.add_argument("--overrides", default="", help='more recipe settings, e.g. "--expert_batch_size 64"')
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    args.overrides = args.overrides.split()
    if args.worker:
        worker(args.worker, args.steps, rest[1:] if rest[:1] == ["--"] else rest)
        return
    for stand_in in args.stand_in:
        from datasets import load_dataset

        train = load_dataset(str(stand_in), split="train")
        per_class = len(train) // train.features["label"].num_classes
        for path in args.paths:
            src = args.old_src if path == "old" else ROOT / "src"
            for cache_state in (["n/a"] if path == "old" else ["cold", "warm"]):
                if cache_state == "cold":
                    shutil.rmtree(args.cache_dir, ignore_errors=True)
                result = launch(src, stand_in, args.cache_dir, args.steps, args.overrides)
                settings = {"recipe": str(RECIPE.relative_to(ROOT)), "base_overrides": OVERRIDES, "ranks": 2,
                            "path": path, "images_per_class": per_class, "train_images": len(train),
                            "image_cache": cache_state, "steps": args.steps, "overrides": args.overrides}
                print(json.dumps({**settings, **result}), flush=True)
                save_record("data_path", settings, result)

if __name__ == "__main__":
    main()
