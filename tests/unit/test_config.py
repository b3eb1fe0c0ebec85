"""The run configuration: YAML + command line, validation, and the storage budget check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from hf_d3.config import D3Config
from hf_d3.config_parser import load_yaml, parse_config
from hf_d3.factories import build_decoder, build_net, planned_storage
from hf_d3.run_plan import plan_subtasks
from hf_d3.sizing import resolve_sizes

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "configs"
# Every shipped config's settings as they parsed when each file still named all of them, before presets.
SHIPPED_SETTINGS = json.loads((Path(__file__).parent / "shipped_configs.json").read_text())


def write_yaml(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_yaml_then_command_line(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"iterations": 7, "latent_dim": 16, "decoder_channels": [16, 8, 8],
                                              "expert_augment": False, "teacher": None})
    config = parse_config(["--config", path, "--latent_dim", "32", "--mmd_bandwidths", "1", "3"])
    assert isinstance(config, D3Config)
    sizes = config.representation
    assert config.distillation.iterations == 7 and sizes.decoder_channels == [16, 8, 8]
    assert config.experts.expert_augment is False
    assert sizes.latent_dim == 32  # the command line wins over the file
    assert config.distillation.mmd_bandwidths == [1.0, 3.0]
    assert config.data.resolution == D3Config().data.resolution  # untouched fields keep their defaults
    assert parse_config(["--config", write_yaml(tmp_path / "empty.yaml", {})]) == D3Config()  # a file: no preset


def test_flat_settings_round_trip_through_the_groups():
    config = parse_config(["--iterations", "9", "--latent_dim", "12", "--eval_seeds", "2", "--teacher", "t"])
    flat = config.to_dict()
    assert flat["iterations"] == 9 and flat["latent_dim"] == 12 and flat["teacher"] == "t"
    assert D3Config.from_dict(flat) == config
    assert (config.distillation.iterations, config.representation.latent_dim, config.evaluation.eval_seeds,
            config.relabel.teacher) == (9, 12, 2, "t")
    with pytest.raises(ValueError, match=r"unknown config keys \['iteratons'\]"):
        D3Config.from_dict({"iteratons": 3})


def test_yaml_numbers_in_exponent_notation(tmp_path):
    # YAML 1.1 reads `1e-6` (no dot) as a string; the value must still arrive as a float
    path = tmp_path / "run.yaml"
    path.write_text("lr_lr: 1e-6\nlr_latents: 5.0e-3\niterations: 3\n")
    config = parse_config(["--config", str(path)])
    objective = config.distillation
    assert objective.lr_lr == 1e-6 and isinstance(objective.lr_lr, float)
    assert objective.lr_latents == 5e-3 and objective.iterations == 3


def test_command_line_booleans():
    assert parse_config(["--no_expert_augment"]).experts.expert_augment is False
    assert parse_config(["--push_to_hub", "--hub_model_id", "me/d3"]).hub.push_to_hub is True


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
    ({"num_subtasks": 0}, "num_subtasks=0 is not valid; valid: >= 1"),
    ({"num_experts": 0}, "num_experts=0 is not valid; valid: >= 1"),
    ({"latents_per_class": 0}, "latents_per_class=0 is not valid; valid: >= 1"),
    ({"max_start_epoch": 0}, "max_start_epoch=0 is not valid; valid: >= 1"),
    ({"mtt_weight": 0.0, "mmd_weight": 0.0}, "not both 0"),
    ({"mmd_weight": -1.0}, "mmd_weight=-1.0 is not valid; valid: >= 0"),
    ({"push_to_hub": True}, "push_to_hub needs hub_model_id"),
    ({"seed": -1}, "seed=-1"),
    ({"decoder_preset": "huge"}, "decoder_preset='huge' is not valid; valid: one of \\['small', 'medium'"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        D3Config.from_dict(kwargs)


@pytest.mark.parametrize("preset, latent_dim", [("small", 64), ("medium", 2048), ("large", 4096)])
def test_a_decoder_preset_brings_its_latent_size(preset, latent_dim):
    config = D3Config.from_dict({"decoder_preset": preset, "resolution": 64, "channels": 3})
    assert config.representation.latent_dim == latent_dim
    assert build_decoder(config.representation, config.data).config.latent_dim == latent_dim
    given = D3Config.from_dict({"decoder_preset": "medium", "latent_dim": 512, "resolution": 64, "channels": 3})
    assert build_decoder(given.representation, given.data).config.latent_dim == 512


def test_net_width_and_depth_size_the_convnet_only():
    convnet = D3Config.from_dict({"net_width": 16, "net_depth": 2})
    assert build_net(convnet.experts, convnet.data, 10).config.to_dict() | {"width": 16, "depth": 2} \
        == build_net(convnet.experts, convnet.data, 10).config.to_dict()
    resnet = D3Config.from_dict({"architecture": "resnet18_ap", "net_width": 128})
    assert build_net(resnet.experts, resnet.data, 10).config.width == 64  # the standard ResNet-18, not 4x its size


def test_short_trajectories_are_fine_without_trajectory_matching():
    config = D3Config.from_dict({"trajectory_epochs": 2, "max_start_epoch": 5, "mtt_weight": 0.0})
    assert config.distillation.mtt_weight == 0
    D3Config.from_dict({"trajectory_epochs": 7, "max_start_epoch": 5, "expert_epochs": 2})  # exactly enough


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


def storage(num_subtasks: int, **settings):
    return planned_storage(D3Config.from_dict({**SMALL, **settings}), plan_subtasks([0, 1, 2], num_subtasks))


def test_storage_budget_met():
    report = storage(2, storage_budget_ipc=19)
    assert report.total_values == 3570 and report.ipc_equivalent == pytest.approx(3570 / (3 * 64))
    assert storage(2).total_values == 3570  # no budget: no limit


def test_storage_budget_the_sizes_cannot_meet():
    with pytest.raises(ValueError) as error:
        storage(2, storage_budget_ipc=18)
    message = str(error.value)
    assert "3,570 values = 18.59 IPC-equivalent, over storage_budget_ipc=18" in message
    assert "decoder 3,444" in message and "shrink latents_per_class, latent_dim or decoder_channels" in message
    # one generator fewer fits the same budget
    assert storage(1, storage_budget_ipc=18).total_values < 3570


SHIPPED_DATASET_CLASSES = {"builtin:fashion_mnist": 10, "uoft-cs/cifar10": 10, "ILSVRC/imagenet-1k": 1000,
                           "zh-plus/tiny-imagenet": 200}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_fit_their_budget(path):
    config = parse_config(["--config", str(path)])
    assert config.run.output_dir
    num_classes = SHIPPED_DATASET_CLASSES[config.data.dataset]
    config = resolve_sizes(config, num_classes)
    report = planned_storage(config, plan_subtasks(list(range(num_classes)), config.run.num_subtasks))  # raises over
    assert 0 < report.ipc_equivalent <= (config.representation.storage_budget_ipc or math.inf)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_keep_their_settings_as_a_preset_and_what_differs(path):
    assert parse_config(["--config", str(path)]).to_dict() == SHIPPED_SETTINGS[path.name]


def test_sizes_auto_on_the_command_line_lets_the_budget_choose_over_a_files_sizes():
    shipped = str(RECIPES / "fashion_mnist.yaml")  # explicit sizes, budget 10
    as_given = parse_config(["--config", shipped])
    assert not as_given.representation.chosen_by_budget and as_given.representation.latents_per_class == 31
    chosen = parse_config(["--config", shipped, "--sizes", "auto"])
    assert chosen.representation.chosen_by_budget and chosen.representation.latents_per_class is None
    assert chosen.distillation.iterations == as_given.distillation.iterations  # the rest of the file holds
    given = parse_config(["--config", shipped, "--sizes", "auto", "--latents_per_class", "20"])
    assert given.representation.latents_per_class == 20  # a size on the command line still wins


def test_a_files_setting_is_unset_from_the_command_line():
    shipped = str(RECIPES / "fashion_mnist.yaml")  # max_train_per_class 1000, logvar_dim 4
    config = parse_config(["--config", shipped, "--max_train_per_class", "none", "--logvar_dim", "None"])
    assert config.data.max_train_per_class is None and config.representation.logvar_dim is None  # one per dimension
    assert parse_config(["--report_to", "none"]).run.report_to == "none"  # not a setting that may be None: a value


def test_an_over_budget_message_names_the_way_out():
    with pytest.raises(ValueError, match=r"over storage_budget_ipc=2.0 .* or let the budget choose them: --sizes auto"):
        planned_storage(parse_config(["--config", str(RECIPES / "fashion_mnist.yaml"), "--storage_budget_ipc", "2"]),
                        plan_subtasks(list(range(10)), 1))
