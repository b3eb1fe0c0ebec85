"""One distilled set stored in each `storage_dtype`: test accuracy and bytes against float32 (docs/method.md, Storage).

    python benchmarks/storage_dtype.py --config recipes/configs/fashion_mnist.yaml --output_dir outputs/storage_dtype \
        [--dtypes float32 float16 bfloat16 int8] [--stage_dir DIR] [any D3Config override]

Every dtype's run is `recipes/distill.py` with `--storage_dtype <dtype>` and one `--stage_dir` (default
`<output_dir>/stages`; a curve's shared stages reuse its distilled set and float32 students), so the experts, the
subtasks and the teacher are distilled and trained once (the storage dtype is in no key of theirs: the set is
quantised at the end of the run, after relabelling) and each dtype gets its own students, which train on what its
files give back. The sizes are the config's (or the budget's in values, so every dtype holds the same values): the
figures say what quantising a finished float32 set costs. A rerun reuses every finished stage.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from accuracy_vs_storage import portable  # this folder is on sys.path when the script runs
from record import save_record

from hf_d3.quantization import STORAGE_DTYPES

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--dtypes", nargs="+", choices=STORAGE_DTYPES, default=list(STORAGE_DTYPES))
    parser.add_argument("--stage_dir", type=Path, default=None)
    args, overrides = parser.parse_known_args()
    stage_dir = args.stage_dir or args.output_dir / "stages"
    rows = {}
    for dtype in args.dtypes:
        run = args.output_dir / dtype
        subprocess.run([sys.executable, str(ROOT / "recipes/distill.py"), "--config", str(args.config), *overrides,
                        "--storage_dtype", dtype, "--output_dir", str(run), "--stage_dir", str(stage_dir)], check=True)
        metrics = json.loads((run / "metrics.json").read_text())
        storage = metrics["storage"]
        rows[dtype] = {"accuracies": metrics["accuracies"], "total_values": storage["total_values"],
                       "total_bytes": storage["total_bytes"], "ipc_equivalent": storage["ipc_equivalent"],
                       "ipc_equivalent_bytes": storage["ipc_equivalent_bytes"]}
        print(f"{dtype}: {100 * sum(metrics['accuracies']) / len(metrics['accuracies']):.2f} % over "
              f"{len(metrics['accuracies'])} students, {storage['total_bytes']:,} bytes")
    settings = {"config": portable(str(args.config.resolve())), "overrides": overrides}
    save_record("storage_dtype", settings, rows,
                notes="one distillation (quantised at the end of the run); students per dtype on its stored files")


if __name__ == "__main__":
    main()
