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
