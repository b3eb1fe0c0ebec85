"""The curve benchmark's bookkeeping: which saved rows answer for today's settings, and what a stale D3 run keeps.
(The rows themselves come from library functions tested elsewhere; the whole script is run by hand: BENCHMARKS.md.)"""

import importlib.util
from pathlib import Path

import pytest

from hf_d3.config import D3Config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_vs_storage.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("accuracy_vs_storage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def settings():
    return {**D3Config().to_dict(), "seeds": 3, "num_threads": 1, "hard_label_weight": 1.0}


def test_a_row_saved_before_a_setting_existed_counts_at_the_value_it_was_computed_with(bench, settings):
    old = {k: v for k, v in settings.items() if k != "hard_label_weight"}  # rows before the label rule used 0
    assert not bench.same_settings(old, settings)
    assert bench.same_settings(old, {**settings, "hard_label_weight": 0.0})
    assert bench.same_settings({**settings, "output_dir": "elsewhere", "log_every": 1}, settings)  # bookkeeping
    assert not bench.same_settings({**settings, "iterations": 61}, settings)


def test_real_images_with_class_ids_ignore_the_label_weight(bench, settings):
    r_h = bench.row_settings("R+H", settings)
    assert "hard_label_weight" not in r_h and bench.row_settings("R+S", settings) == settings
    assert bench.same_settings(bench.row_settings("R+H", {**settings, "hard_label_weight": 0.0}), r_h)


def saved_run(folder: Path, settings: dict) -> tuple[Path, dict]:
    run = folder / "d3"
    (run / "subtasks" / "subtask_0").mkdir(parents=True)
    (run / "subtasks" / "subtask_0" / "done.json").write_text("{}")
    (run / "metrics.json").write_text("{}")
    return run, {"settings": settings, "row": {"distill_wall_time_s": 123.0}}


def test_a_stale_d3_run_keeps_its_distillation_when_only_labels_or_students_changed(bench, settings, tmp_path):
    run, saved = saved_run(tmp_path, settings)
    assert bench.withdraw_stale_run(run, saved, settings) is None and (run / "metrics.json").is_file()  # up to date

    relabelled = {**settings, "hard_label_weight": 0.5, "eval_steps": 10, "seeds": 5}
    assert bench.withdraw_stale_run(run, saved, relabelled) == 123.0
    assert not (run / "metrics.json").exists() and (run / "subtasks" / "subtask_0" / "done.json").is_file()

    run, saved = saved_run(tmp_path / "other", settings)
    assert bench.withdraw_stale_run(run, saved, {**settings, "iterations": 61}) is None
    assert not run.exists()  # distilled with other settings: started afresh


def test_rows_within_2_std_of_another_get_more_seeds(bench):
    rows = {"D3": {"accuracies": [0.70, 0.72, 0.71]}, "R+S": {"accuracies": [0.715, 0.705, 0.725]},
            "R+H": {"accuracies": [0.50, 0.51, 0.49]}}
    assert bench.close_methods(rows) == {"D3", "R+S"}
