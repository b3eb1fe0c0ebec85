import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "federated_many_classes.py"


def test_an_unknown_run_is_refused_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--runs", "k1", "k9-p1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "--runs k9-p1: the runs are k1, k4-p1, k4-p2" in result.stderr
    assert not any(tmp_path.iterdir())  # no stage was made
