"""A newcomer's own data with the defaults: `accelerate launch recipes/distill.py --dataset <data>
--storage_budget_ipc <B>` and nothing else, timed, its peak resident memory and its students' accuracy recorded.

    python benchmarks/own_data.py --dataset <folder or Hub id> [--storage_budget_ipc 10] --output_dir outputs/own
    python benchmarks/own_data.py --write_png_folder outputs/pngs   # the 5-class stand-in below, then exit

`--write_png_folder` writes the stand-in the issue was found on: 5 Fashion-MNIST classes (offline, from the Debian
package) as `<split>/<class>/<n>.png`, 60 training and 40 test images a class. The run's own stages make a rerun
continue where it stopped; its record holds the wall time of this process's run (a rerun that reuses stages is
faster: delete the output folder to time a fresh run).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from record import save_record  # this folder is on sys.path when the script runs

ROOT = Path(__file__).resolve().parents[1]
PNG_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat"]  # Fashion-MNIST classes 0-4


def write_png_folder(root: Path, per_class: dict[str, int], side: int = 28, mode: str = "L") -> Path:
    """Real Fashion-MNIST images of 5 classes as `<root>/<split>/<class>/<n>.png`, at `side` in PIL `mode`."""
    import numpy as np
    from PIL import Image

    from hf_d3.data import FASHION_MNIST_DIR, _read_idx

    images = _read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    start = 0
    for split, count in per_class.items():
        for label, name in enumerate(PNG_CLASSES):
            (root / split / name).mkdir(parents=True)
            for n, index in enumerate(np.flatnonzero(labels == label)[start:start + count]):
                image = Image.fromarray(images[index]).resize((side, side)).convert(mode)
                image.save(root / split / name / f"{n}.png")
        start += count
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="an image folder (relative to where you run this) or a Hub dataset id")
    parser.add_argument("--storage_budget_ipc", type=float, default=10)
    parser.add_argument("--output_dir", type=Path)
    parser.add_argument("--write_png_folder", type=Path, help="write the 5-class PNG stand-in here and exit")
    args = parser.parse_args()
    if args.write_png_folder:
        write_png_folder(args.write_png_folder, {"train": 60, "test": 40})
        return
    if not (args.dataset and args.output_dir):
        parser.error("--dataset and --output_dir are needed (or --write_png_folder)")
    command = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "recipes/distill.py", "--dataset", args.dataset,
               "--storage_budget_ipc", f"{args.storage_budget_ipc:g}", "--output_dir", str(args.output_dir)]
    start = time.perf_counter()
    recipe = command.index("recipes/distill.py")  # run from here, so relative paths mean what they say
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *command[2:recipe],
                    str(ROOT / "recipes/distill.py"), *command[recipe + 1:]], check=True)
    wall_time = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest process that ran, on Linux
    metrics = json.loads((args.output_dir / "metrics.json").read_text())
    chosen = json.loads((args.output_dir / "config.json").read_text())
    dataset = Path(args.dataset)
    figures = {"wall_time_s": round(wall_time, 1), "peak_rss_gib": round(peak_kib / 2**20, 2),
               "accuracies": metrics["accuracies"], "teacher_accuracy": metrics.get("teacher_accuracy"),
               "ipc_equivalent": metrics["storage"]["ipc_equivalent"],
               "resolution": chosen["resolution"], "channels": chosen["channels"]}
    save_record("own_data", {"dataset": dataset.name if dataset.exists() else args.dataset,
                             "storage_budget_ipc": args.storage_budget_ipc, "command": " ".join(command[:-2])},
                figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
