"""A subtask's resumable distillation (`hf_d3.distill.subtask.distilled_subtask`): a subtask of more iterations
continues from one of fewer, and one resumed after its warm start equals an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TINY_RUN

from hf_d3.config import D3Config
from hf_d3.data import load_image_dataset
from hf_d3.distill.subtask import distilled_subtask
from hf_d3.federated import train_expert_trajectories
from hf_d3.run_plan import make_plan


def _distill_subtask_1(dataset: Path, folder: Path, **overrides) -> dict:
    """Subtask 1 of TINY_RUN (warm-started) distilled into `folder`, its experts trained first if missing."""
    train = load_image_dataset(str(dataset), "train")
    config = D3Config.from_dict({**TINY_RUN, "dataset": str(dataset), "output_dir": str(folder), "init": "real",
                                 "num_subtasks": 2, **overrides})
    plan = make_plan(config, train.features["label"].names, "no")
    train_expert_trajectories(config, plan, train, torch.device("cpu"))
    store, decoder, stats = distilled_subtask(config, plan, 1, train, torch.device("cpu"))
    return {"latent_store": store, "decoder": decoder, "stats": stats, "folder": plan.subtask_stages[1].folder(folder)}


def _assert_same_subtask(got: dict, expected: dict) -> None:
    assert got["stats"].iterations_run == expected["stats"].iterations_run
    assert torch.equal(got["latent_store"].mean, expected["latent_store"].mean)
    for name, value in expected["decoder"].state_dict().items():
        assert torch.equal(got["decoder"].state_dict()[name], value), name


def test_a_subtask_of_more_iterations_continues_from_one_of_fewer(fmnist4_folder, tmp_path, caplog):
    fresh = _distill_subtask_1(fmnist4_folder, tmp_path / "fresh")
    first = _distill_subtask_1(fmnist4_folder, tmp_path / "more", iterations=1)
    done = first["folder"] / "stage.json"
    assert first["stats"].iterations_run == 1 and done.is_file()
    again = done.stat().st_mtime_ns
    _distill_subtask_1(fmnist4_folder, tmp_path / "more", iterations=1)
    assert done.stat().st_mtime_ns == again  # as much as asked: reused
    with caplog.at_level("INFO", logger="hf_d3"):
        more = _distill_subtask_1(fmnist4_folder, tmp_path / "more")
    assert f"subtask 1: continues from {first['folder'] / 'checkpoint'}" in caplog.text
    assert more["folder"] != first["folder"] and done.stat().st_mtime_ns == again  # a complete stage never changes
    _assert_same_subtask(more, fresh)
    fewer = _distill_subtask_1(fmnist4_folder, tmp_path / "more", iterations=0)  # none of fewer: afresh, not reused
    assert fewer["stats"].iterations_run == 0


def test_a_subtask_continued_after_its_warm_start_equals_an_uninterrupted_one(fmnist4_folder, tmp_path):
    fresh = _distill_subtask_1(fmnist4_folder, tmp_path / "fresh")
    # distilled for 0 iterations, its final checkpoint holds the state after the warm start
    warm = _distill_subtask_1(fmnist4_folder, tmp_path / "resumed", iterations=0)["folder"]
    warm_started = (warm / "warm_start.json").stat().st_mtime_ns
    resumed = _distill_subtask_1(fmnist4_folder, tmp_path / "resumed")
    assert resumed["folder"] != warm and (warm / "warm_start.json").stat().st_mtime_ns == warm_started
    assert resumed["stats"].warm_start_mse == fresh["stats"].warm_start_mse is not None  # not warm-started again
    assert resumed["stats"].iterations_run == TINY_RUN["iterations"]
    _assert_same_subtask(resumed, fresh)
