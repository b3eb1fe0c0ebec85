"""The run configuration: YAML + command line, validation, and the storage budget check."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_d3.config import D3Config, load_yaml, parse_config
from hf_d3.run import check_storage_budget

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def write_yaml(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_then_command_line(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"iterations": 7, "latent_dim": 16, "decoder_channels": [16, 8, 8],
                                              "expert_augment": False, "teacher": None})
    config = parse_config(["--config", path, "--latent_dim", "32", "--mmd_bandwidths", "1", "3"])
    assert isinstance(config, D3Config)
    assert config.iterations == 7 and config.decoder_channels == [16, 8, 8] and config.expert_augment is False
    assert config.latent_dim == 32  # the command line wins over the file
    assert config.mmd_bandwidths == [1.0, 3.0]
    assert config.resolution == D3Config().resolution  # untouched fields keep their defaults
    assert parse_config([]) == D3Config()


def test_yaml_numbers_in_exponent_notation(tmp_path):
    # YAML 1.1 reads `1e-6` (no dot) as a string; the value must still arrive as a float
    path = tmp_path / "run.yaml"
    path.write_text("lr_lr: 1e-6\nlr_latents: 5.0e-3\niterations: 3\n")
    config = parse_config(["--config", str(path)])
    assert config.lr_lr == 1e-6 and isinstance(config.lr_lr, float)
    assert config.lr_latents == 5e-3 and config.iterations == 3


def test_command_line_booleans():
    assert parse_config(["--no_expert_augment"]).expert_augment is False
    assert parse_config(["--push_to_hub", "--hub_model_id", "me/d3"]).push_to_hub is True


def test_unknown_yaml_key_is_named(tmp_path):
    path = write_yaml(tmp_path / "typo.yaml", {"iterations": 3, "iteratons": 5, "latent_dimm": 4})
    with pytest.raises(ValueError, match=r"unknown config keys \['iteratons', 'latent_dimm'\] in .*typo.yaml"):
        parse_config(["--config", path])
    with pytest.raises(ValueError, match="iteratons"):
        load_yaml(path)


def test_invalid_command_line_value_exits():
    with pytest.raises(SystemExit) as error:
        parse_config(["--iterations", "many"])
    assert error.value.code == 2


def test_unknown_command_line_argument_exits(capsys):
    with pytest.raises(SystemExit) as error:
        parse_config(["--iterations", "3", "--not_a_field", "1"])
    assert error.value.code == 2
    assert "--not_a_field" in capsys.readouterr().err


def test_unknown_command_line_argument_is_refused():
    """Whatever the form of the error, a typo must never be silently ignored."""
    with pytest.raises((SystemExit, ValueError)):
        parse_config(["--not_a_field", "1"])


@pytest.mark.parametrize("kwargs, message", [
    ({"trajectory_epochs": 6, "max_start_epoch": 5, "expert_epochs": 2},
     "trajectory_epochs=6 is too few for max_start_epoch=5 \\+ expert_epochs=2: train at least 7"),
    ({"init": "warm"}, "init='warm' is not valid"),
    ({"architecture": "vgg"}, "architecture='vgg' is not valid"),
    ({"channels": 2}, "channels=2 is not valid"),
    ({"decoder_upsample": "pixelshuffle"}, "decoder_upsample='pixelshuffle' is not valid"),
    ({"num_subtasks": 0}, "num_subtasks, num_experts, latents_per_class and max_start_epoch must all be >= 1"),
    ({"max_start_epoch": 0}, "max_start_epoch must all be >= 1"),
    ({"mtt_weight": 0.0, "mmd_weight": 0.0}, "not both 0"),
    ({"mmd_weight": -1.0}, "need >= 0"),
    ({"push_to_hub": True}, "push_to_hub needs hub_model_id"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D3Config(**kwargs)


def test_short_trajectories_are_fine_without_trajectory_matching():
    assert D3Config(trajectory_epochs=2, max_start_epoch=5, mtt_weight=0.0).mtt_weight == 0
    D3Config(trajectory_epochs=7, max_start_epoch=5, expert_epochs=2)  # exactly enough


def test_short_trajectories_from_the_command_line(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"trajectory_epochs": 4, "max_start_epoch": 2})
    with pytest.raises(ValueError, match="trajectory_epochs=4 is too few"):
        parse_config(["--config", path, "--expert_epochs", "3"])


# ----------------------------------------------------------------------------------------------------------
# Storage budget
# ----------------------------------------------------------------------------------------------------------

# 3 classes x 2 components of 8-d latents, two subtask generators of Linear(8 -> 8x4x4), ConvT(8 -> 4, k4),
# BatchNorm(4), Conv3x3(4 -> 1) at 8x8 grayscale: 3,570 values = 18.59 IPC (see test_pipeline's hand count).
SMALL = {"resolution": 8, "channels": 1, "latents_per_class": 2, "latent_dim": 8, "decoder_channels": [8, 4],
         "decoder_kernel_size": 4}


def test_storage_budget_met():
    report = check_storage_budget(D3Config(**SMALL, storage_budget_ipc=19), [0, 1, 2], num_subtasks=2)
    assert report["total_values"] == 3570 and report["ipc_equivalent"] == pytest.approx(3570 / (3 * 64))
    assert check_storage_budget(D3Config(**SMALL), [0, 1, 2], 2)["total_values"] == 3570  # no budget: no limit


def test_storage_budget_the_sizes_cannot_meet():
    with pytest.raises(ValueError) as error:
        check_storage_budget(D3Config(**SMALL, storage_budget_ipc=18), [0, 1, 2], num_subtasks=2)
    message = str(error.value)
    assert "3,570 values = 18.59 IPC-equivalent, over storage_budget_ipc=18" in message
    assert "decoder 3,444" in message and "shrink latents_per_class, latent_dim or decoder_channels" in message
    # one generator fewer fits the same budget
    assert check_storage_budget(D3Config(**SMALL, storage_budget_ipc=18), [0, 1, 2], 1)["total_values"] < 3570


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_fit_their_budget(path):
    config = parse_config(["--config", str(path)])
    assert config.dataset and config.output_dir
    if config.dataset == "builtin:fashion_mnist":  # 10 classes: the planned storage must fit the file's own budget
        report = check_storage_budget(config, list(range(10)), config.num_subtasks)
        assert config.storage_budget_ipc is None or report["ipc_equivalent"] <= config.storage_budget_ipc
