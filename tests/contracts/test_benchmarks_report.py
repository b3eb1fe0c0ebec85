"""BENCHMARKS.md is written by benchmarks/report.py from benchmarks/results/*.json and nothing else."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("report") / "BENCHMARKS.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--output", str(output)], check=True)
    return output.read_text()


def test_the_committed_page_is_what_the_records_give(regenerated):
    assert regenerated == (ROOT / "BENCHMARKS.md").read_text(), "run `python benchmarks/report.py` and commit"


def test_the_page_fits_on_a_screen_and_says_who_wrote_it(regenerated):
    assert len(regenerated.encode()) < 15_000
    assert "benchmarks/report.py" in "".join(regenerated.splitlines()[:3])


def test_every_record_has_its_provenance():
    from record import FIELDS, load_records

    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        for record in load_records(path):
            assert record["benchmark"] == path.stem
            assert all(record[field] for field in FIELDS if field != "settings"), (path.name, record["settings"])


def curve_record(method: str, accuracies: list[float], commit: str, budget: float = 1.0) -> dict:
    return {"benchmark": "accuracy_vs_storage", "machine": "m", "date": "2026-12-07", "commit": commit,
            "command": f"python benchmarks/accuracy_vs_storage.py --budgets {budget:g} 2 --methods {method} R+S",
            "settings": {"dataset": "fashion_mnist", "budget_ipc": budget, "method": method},
            "figures": {"accuracies": accuracies}}


def test_the_page_says_where_a_baseline_reaches_d3_and_folds_a_command_run_at_two_commits(tmp_path):
    import json

    from report import render

    records = [curve_record("D3", [0.60, 0.62], "aaaaaaa1"), curve_record("R+S", [0.61, 0.61], "bbbbbbb2"),
               curve_record("R+H", [0.50, 0.52], "bbbbbbb2"), curve_record("D3", [0.70], "aaaaaaa1", budget=2.0),
               curve_record("prototypes", [0.69], "aaaaaaa1", budget=2.0)]
    records[-1]["settings"]["config"] = {"label_temperatures": [0.5, 1.0]}  # its labels' temperature chosen
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):  # the other tables' records as they are
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "accuracy_vs_storage.json").write_text(json.dumps(records))
    page = render(tmp_path)

    assert "**A baseline at or above D3** (mean) at budget 1 (R+S)." in page  # 61 >= 61; R+H and budget 2 below
    assert "| 69.00 ± 0.00° [1] |" in page and "| 70.00 ± 0.00 [1] |" in page  # ° marks the chosen temperature
    notes = [line for line in page.splitlines() if "accuracy_vs_storage.py --budgets" in line]
    assert notes == ["1. m, 2026-12-07, aaaaaaa, bbbbbbb: `python benchmarks/accuracy_vs_storage.py "
                     "--budgets <budgets> --methods <methods>`"]
