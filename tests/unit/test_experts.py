"""Expert trajectories (`hf_d3.experts`): recorded every epoch, saved as safetensors, and trained only where
missing."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_net, stage_folders, tiny_plan
from safetensors import safe_open

from hf_d3.data import load_image_dataset
from hf_d3.experts import flat_parameters, load_trajectory, save_trajectory, train_classifier
from hf_d3.federated import train_expert_trajectories


def test_train_classifier_records_every_epoch(trajectory, data):
    net, steps = trajectory
    assert steps.shape == (3, sum(p.numel() for p in net.parameters()))
    assert torch.equal(steps[-1], flat_parameters(net))  # the last entry is the trained network
    assert (steps[1] - steps[0]).norm() > 0 and (steps[2] - steps[1]).norm() > 0
    torch.manual_seed(0)
    again = train_classifier(make_net(), data.images, data.labels, 2, 0.01, 32, torch.Generator().manual_seed(0),
                             augment=False)
    assert torch.equal(torch.stack(again), steps)  # seeded: the same trajectory


def test_trajectory_round_trip_through_safetensors(trajectory, tmp_path):
    net, steps = trajectory
    folder = tmp_path / "expert"
    save_trajectory(folder, net.config.to_dict(), list(steps))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "trajectory.safetensors"]  # no .partial
    with safe_open(str(folder / "trajectory.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["epoch_0", "epoch_1", "epoch_2"]
        assert f.metadata() == {"num_epochs": "2"}
    model, loaded = load_trajectory(folder)
    assert torch.equal(loaded, steps)
    assert type(model) is type(net)
    assert (model.config.width, model.config.depth, model.config.num_labels) == (8, 2, 4)
    assert sum(p.numel() for p in model.parameters()) == loaded.shape[1]


def test_expert_training_resumes_from_what_is_on_disk(fmnist4_folder, tiny_run, tmp_path):
    train = load_image_dataset(str(fmnist4_folder), "train")

    def train_experts(num_experts: int, **settings) -> list[Path]:
        config = tiny_run(num_experts=num_experts, num_subtasks=2, output_dir=str(tmp_path), **settings)
        summary = train_expert_trajectories(config, tiny_plan(config), train, torch.device("cpu"))
        assert len(summary) == 1 and summary[0].rank == 0
        return stage_folders(tmp_path, "experts"), summary[0].experts

    paths, trained = train_experts(2)
    assert [p.name.rsplit("-", 1)[0] for p in paths] == [f"subtask{k}-expert{i}" for k in (0, 1) for i in (0, 1)]
    assert trained == [(0, 0), (1, 0), (0, 1), (1, 1)]  # expert index first
    mtimes = {p: (p / "trajectory.safetensors").stat().st_mtime_ns for p in paths}
    first = load_trajectory(paths[0])[1]
    model = load_trajectory(paths[2])[0]
    assert model.config.num_labels == 2  # an expert of subtask 1 knows only its 2 classes

    paths, trained = train_experts(3)
    assert trained == [(0, 2), (1, 2)]  # only what is missing
    assert mtimes == {p: (p / "trajectory.safetensors").stat().st_mtime_ns for p in mtimes}  # not retrained
    third = next(p for p in paths if p.name.startswith("subtask0-expert2-"))
    assert not torch.equal(load_trajectory(third)[1], first)
    assert torch.equal(load_trajectory(paths[0])[1], first)

    _, trained = train_experts(2, expert_lr=0.02)  # other settings: new experts, the others kept beside them
    assert trained == [(0, 0), (1, 0), (0, 1), (1, 1)] and len(stage_folders(tmp_path, "experts")) == 10
