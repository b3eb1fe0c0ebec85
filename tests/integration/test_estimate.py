"""`hf_d3.estimate` against a real run: recipes/distill.py on a 5-class PNG folder with the cpu preset's settings, its
phases cut short, timed and measured by GNU time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import write_png_folder

from hf_d3.config_parser import parse_config
from hf_d3.data import class_names_of
from hf_d3.estimate import estimate_run
from hf_d3.run_plan import make_plan

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "distill.py"
TIME_FACTOR = 3  # the estimate is within this factor of the measured wall time
MEMORY_FACTOR = 2  # and of the measured peak resident memory


def test_the_estimate_is_within_its_factors_of_a_real_run(tmp_path):
    folder = write_png_folder(tmp_path / "mydata", {"train": 36, "test": 4})
    args = ["--dataset", str(folder), "--preset", "cpu", "--output_dir", str(tmp_path / "run"), "--init_steps", "50",
            "--iterations", "5", "--teacher_epochs", "1", "--eval_steps", "40", "--eval_seeds", "1"]
    config = parse_config(args)
    estimate = estimate_run(config, make_plan(config, class_names_of(config.data), "no"), num_train_images=180)

    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, str(RECIPE), *args], capture_output=True,
                          text=True, timeout=600, env={"TQDM_DISABLE": "1", **os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    seconds, kib = map(float, done.stderr.strip().splitlines()[-1].split())
    assert 1 / TIME_FACTOR <= estimate.total_seconds / seconds <= TIME_FACTOR, (estimate, seconds)
    assert 1 / MEMORY_FACTOR <= estimate.peak_bytes / (kib * 1024) <= MEMORY_FACTOR, (estimate, kib)
