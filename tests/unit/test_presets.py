"""Defaults from the data and the machine: a preset beneath the config file and the command line, the resolution
and channels read from the images, a default budget when no size is given."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_png_folder

from hf_d3.config_parser import parse_config, parse_with_sources
from hf_d3.data import class_names_of
from hf_d3.presets import DEFAULT_BUDGET_IPC, MAX_RESOLUTION, PRESETS
from hf_d3.run_plan import make_plan


@pytest.fixture(scope="module")
def mydata(tmp_path_factory) -> Path:
    return write_png_folder(tmp_path_factory.mktemp("mydata"), {"train": 6, "test": 2})


@pytest.fixture
def without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_png_folder_alone_gets_a_config_that_plans(mydata, without_cuda):
    config = parse_config(["--dataset", str(mydata)])
    assert (config.data.resolution, config.data.channels) == (28, 1)
    assert config.representation.storage_budget_ipc == DEFAULT_BUDGET_IPC and config.representation.chosen_by_budget
    assert config.experts.net_width == PRESETS["cpu"]["net_width"]  # no CUDA: the cpu preset
    assert config.distillation.iterations == PRESETS["cpu"]["iterations"]
    plan = make_plan(config, class_names_of(config.data), "no")  # the defaults agree with one another
    assert plan.storage.ipc_equivalent <= DEFAULT_BUDGET_IPC


def test_resolution_and_channels_come_from_the_images_at_most_the_presets_side(tmp_path, without_cuda):
    colour = write_png_folder(tmp_path / "colour", {"train": 1}, side=24, mode="RGB")
    config = parse_config(["--dataset", str(colour), "--storage_budget_ipc", "2"])
    assert (config.data.resolution, config.data.channels) == (24, 3)
    large = write_png_folder(tmp_path / "large", {"train": 1}, side=80, mode="RGB")
    assert parse_config(["--dataset", str(large)]).data.resolution == MAX_RESOLUTION["cpu"] == 32
    assert parse_config(["--dataset", str(large), "--preset", "gpu"]).data.resolution == MAX_RESOLUTION["gpu"] == 64
    odd = write_png_folder(tmp_path / "odd", {"train": 1}, side=27, mode="RGB")
    assert parse_config(["--dataset", str(odd)]).data.resolution == 26  # a side the decoder's doublings reach


def test_explicit_settings_win_over_the_preset_and_the_images(mydata, tmp_path, without_cuda):
    config = parse_config(["--dataset", str(mydata), "--net_width", "48", "--resolution", "16",
                           "--max_train_per_class", "none", "--latents_per_class", "3"])
    assert config.experts.net_width == 48 and config.data.resolution == 16 and config.data.max_train_per_class is None
    assert config.representation.storage_budget_ipc is None  # a size given: no default budget to check it against
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({"preset": "cpu", "dataset": str(mydata), "iterations": 5}))
    (config,), sources = parse_with_sources(["--config", str(file), "--eval_steps", "7"])
    assert (config.distillation.iterations, config.evaluation.eval_steps) == (5, 7)
    assert config.experts.num_experts == PRESETS["cpu"]["num_experts"]
    assert sources["iterations"] == "config" and sources["eval_steps"] == "command line"
    assert sources["num_experts"] == "preset cpu" and sources["resolution"] == "the images"


def test_a_preset_is_chosen_by_name_or_by_the_machine(mydata, monkeypatch):
    assert parse_config(["--dataset", str(mydata), "--preset", "gpu"]).experts.num_experts == 20
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_config(["--dataset", str(mydata)]).experts.net_width == PRESETS["gpu"]["net_width"]


def test_dashed_options_count_as_given_and_a_files_preset_yields_to_the_command_lines(mydata, tmp_path,
                                                                                      without_cuda):
    (config,), sources = parse_with_sources(["--dataset", str(mydata), "--latents-per-class", "3"])
    assert config.representation.latents_per_class == 3 and sources["latents_per_class"] == "command line"
    assert config.representation.storage_budget_ipc is None  # a size given: no default budget beside it
    file = tmp_path / "preset.yaml"
    file.write_text(yaml.safe_dump({"preset": "cpu", "dataset": str(mydata)}))
    (config,), sources = parse_with_sources(["--config", str(file), "--preset", "gpu"])
    assert "preset" not in sources and config.experts.net_width == PRESETS["gpu"]["net_width"]
