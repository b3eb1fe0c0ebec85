"""The one record every benchmark script writes to `benchmarks/results/<benchmark>.json`.

A results file is a list of records (a file holding {"records": [...]} reads the same). A record:

    benchmark  the script that measured it ("accuracy_vs_storage", "mtt_iteration", ...)
    command    the command line that ran it
    commit     the code it ran (`git rev-parse HEAD`, "+dirty" when the working tree had changes)
    date       the day it ran (YYYY-MM-DD)
    machine    an id: "amd-epyc-2c", "intel-xeon-2c", "nvidia-h200" (cpu vendor and family, cores; or the GPU)
    settings   what was measured: the dataset, budget, method, config ... that tell two records apart
    figures    what was measured: per-seed accuracies where there are seeds, timings, memory
    notes      (optional) conditions of the run worth knowing when reading the figures

A new record replaces the one with the same benchmark, machine and settings, so a rerun updates its row; history
stays in git. `benchmarks/report.py` writes BENCHMARKS.md from these files.
"""

import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("benchmark", "command", "commit", "date", "machine", "settings", "figures")


def load_records(path: Path) -> list[dict]:
    """The records of one results file; [] when it does not exist."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    records = data["records"] if isinstance(data, dict) else data
    for record in records:
        missing = [field for field in FIELDS if field not in record]
        if missing:
            raise ValueError(f"{path}: a record lacks {missing}; every record needs {list(FIELDS)}")
    return records


def machine_id() -> str:
    """"nvidia-h200" on a GPU, else the CPU's vendor and family and its core count, e.g. "amd-epyc-2c"."""
    import torch

    if torch.cuda.is_available():
        return slug(torch.cuda.get_device_name())
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1] for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    family = " ".join(re.sub(r"\(.*?\)", "", model).split()[:2])  # "Intel(R) Xeon(R) Processor" -> "Intel Xeon"
    return f"{slug(family or platform.machine())}-{os.cpu_count()}c"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def current_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=RESULTS, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + "+dirty" if git("status", "--porcelain", "--untracked-files=no") else commit


def save_record(benchmark: str, settings: dict, figures: dict, notes: str | None = None,
                results: Path = RESULTS) -> dict:
    """Write this run's record into `<results>/<benchmark>.json`, replacing the one with the same settings."""
    threads = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    record = {"benchmark": benchmark, "command": " ".join([*threads, "python", *sys.argv]), "commit": current_commit(),
              "date": datetime.date.today().isoformat(), "machine": machine_id(), "settings": settings,
              "figures": figures}
    if notes:
        record["notes"] = notes
    path = results / f"{benchmark}.json"
    same = (benchmark, record["machine"], json.dumps(settings, sort_keys=True))
    kept = [r for r in load_records(path)
            if (r["benchmark"], r["machine"], json.dumps(r["settings"], sort_keys=True)) != same]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([*kept, record], indent=1) + "\n")
    return record
