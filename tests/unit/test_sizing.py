"""The budget solver: sizes chosen from `storage_budget_ipc` (hf_d3.sizing)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN

from hf_d3 import D3Pipeline
from hf_d3.config import PAPER_SIZES, D3Config
from hf_d3.config_parser import parse_config
from hf_d3.factories import build_decoder, planned_storage
from hf_d3.models.decoder import upsampling_stages
from hf_d3.presets import PRESETS
from hf_d3.quantization import STORAGE_DTYPES, VALUE_BYTES
from hf_d3.run import run_distillation
from hf_d3.run_plan import plan_subtasks
from hf_d3.sizing import TARGET_START_SIDE, decoder_widths, resolve_sizes, solve_sizes
from hf_d3.teacher import hard_label_weight_for

BUDGETS = (1, 2, 5, 10, 20, 50)
CLASSES = (10, 100, 1000)
RESOLUTIONS = (28, 32, 64)
CHANNELS = (1, 3)
SUBTASKS = (1, 2, 5)
GRID = [c for c in itertools.product(BUDGETS, CLASSES, RESOLUTIONS, CHANNELS, SUBTASKS) if c[4] <= c[1]]

# The grid's budgets that no size fits: a 1000-way soft label outweighs a whole 28x28 or 32x32 grayscale image,
# and five of the narrowest decoders outweigh ten 28x28 images.
TOO_SMALL = {(1, 1000, r, 1, k) for r in (28, 32) for k in SUBTASKS} | {(1, 10, 28, 1, 5)}

SMALLEST_BUDGET = re.compile(r"smallest budget that works is ([0-9.]+) IPC-equivalent")

CPU_DECODER_WIDTH = PRESETS["cpu"]["decoder_max_width"]


def test_the_solver_never_exceeds_the_budget_and_fills_at_least_90_percent_of_it():
    too_small = set()
    for budget, num_classes, resolution, channels, k in GRID:
        try:
            sizes = solve_sizes(budget, num_classes, resolution, channels, k)
        except ValueError as error:
            too_small.add((budget, num_classes, resolution, channels, k))
            assert float(SMALLEST_BUDGET.search(str(error)).group(1)) > budget
            continue
        report = sizes.storage(num_classes, resolution, channels, k)
        assert 0.9 * budget <= report.ipc_equivalent <= budget, (budget, num_classes, resolution, channels, k)
        assert sizes.latents_per_class >= 1
        side = resolution // 2 ** (len(sizes.decoder_channels) - 1)
        assert sizes.latent_dim == sizes.decoder_channels[0] * side**2
        assert sizes.logvar_dim == sizes.decoder_channels[0]  # one log-variance per latent channel
        assert (sizes.decoder_latent_projection, sizes.decoder_upsample) == (False, "nearest")
    assert too_small == TOO_SMALL


@pytest.mark.parametrize("storage_dtype", STORAGE_DTYPES)
def test_in_bytes_the_solver_never_exceeds_the_budget_and_fills_at_least_90_percent_of_it(storage_dtype):
    # the grid's budgets in the bytes that hold as many values as they do (4 bytes per float32 value)
    for values_budget, num_classes, resolution, channels, k in GRID:
        budget = values_budget * VALUE_BYTES[storage_dtype]
        try:
            sizes = solve_sizes(budget, num_classes, resolution, channels, k, storage_dtype, "bytes")
        except ValueError as error:
            smallest = float(SMALLEST_BUDGET.search(str(error)).group(1))
            assert smallest > budget and " bytes: one Gaussian" in str(error)
            continue
        report = sizes.storage(num_classes, resolution, channels, k, storage_dtype)
        assert 0.9 * budget <= report.ipc_equivalent_bytes <= budget, (budget, num_classes, resolution, channels, k)
        assert sizes.latents_per_class >= 1


@pytest.mark.parametrize("budget_unit, storage_dtype", [("values", "float32"), ("bytes", "int8")])
def test_top_k_labels_free_storage_for_more_gaussians_within_the_budget(budget_unit, storage_dtype):
    # Tiny ImageNet's shape: at 2 IPC-equivalent whole soft labels take 200 values a Gaussian
    whole, top_10 = (solve_sizes(2, 200, 32, 3, 1, storage_dtype, budget_unit, CPU_DECODER_WIDTH, label_top_k=k)
                     for k in (None, 10))
    assert top_10.latents_per_class > whole.latents_per_class
    report = top_10.storage(200, 32, 3, 1, storage_dtype, label_top_k=10)
    used = report.ipc_equivalent if budget_unit == "values" else report.ipc_equivalent_bytes
    assert 0.9 * 2 <= used <= 2
    assert report.label_values == 200 * top_10.latents_per_class * (10 + 10 + 2)


def test_in_bytes_an_int8_d3_gets_about_four_times_the_values_of_a_float32_one():
    float32, int8 = (solve_sizes(10, 10, 28, 1, storage_dtype=dtype, budget_unit="bytes").storage(10, 28, 1)
                     for dtype in ("float32", "int8"))
    assert 3.5 < int8.total_values / float32.total_values < 4.2
    # and a budget in bytes at float32 holds a quarter of the values of the same budget in values
    assert solve_sizes(10, 10, 28, 1, budget_unit="bytes") == solve_sizes(2.5, 10, 28, 1)


def test_the_solver_is_deterministic_and_pure():
    cases = [(10, 10, 28, 1, 1), (2, 100, 32, 3, 5), (50, 1000, 64, 3, 2), (2, 1000, 32, 1, 2)]
    first = [solve_sizes(*case) for case in cases]
    solve_sizes(1, 10, 64, 1)  # no state carries from one call to the next
    assert [solve_sizes(*case) for case in reversed(cases)] == first[::-1]


def test_a_latent_of_any_channel_count_when_no_power_of_two_fills_the_budget():
    sizes = solve_sizes(2, 1000, 32, 1, 2)  # a 1000-way soft label outweighs the latent
    assert sizes.decoder_channels[0] & (sizes.decoder_channels[0] - 1)
    assert 0.9 * 2 <= sizes.storage(1000, 32, 1, 2).ipc_equivalent <= 2


def test_a_too_small_budget_names_the_smallest_budget_that_works():
    with pytest.raises(ValueError, match=r"storage_budget_ipc=0.05 is too small for 10 classes at 28x28x1 with "
                                         r"1 subtask\(s\)") as error:
        solve_sizes(0.05, 10, 28, 1)
    smallest = float(SMALLEST_BUDGET.search(str(error.value)).group(1))
    sizes = solve_sizes(smallest, 10, 28, 1)
    assert sizes.storage(10, 28, 1).ipc_equivalent <= smallest
    with pytest.raises(ValueError, match="too small"):
        solve_sizes(smallest * 0.9, 10, 28, 1)


@pytest.mark.parametrize("num_classes, resolution, channels, k", [(1000, 28, 1, 5), (10, 28, 1, 5), (100, 64, 3, 1)])
def test_every_named_smallest_budget_can_be_solved(num_classes, resolution, channels, k):
    with pytest.raises(ValueError, match="too small") as error:
        solve_sizes(1e-4, num_classes, resolution, channels, k)
    smallest = float(SMALLEST_BUDGET.search(str(error.value)).group(1))
    assert solve_sizes(smallest, num_classes, resolution, channels, k).storage(
        num_classes, resolution, channels, k).ipc_equivalent <= smallest


@pytest.mark.parametrize("budget, resolution, channels, latent_shape", [
    (10, 28, 1, (4, 7)), (50, 28, 1, (8, 7)), (10, 32, 3, (8, 8)), (50, 32, 3, (16, 8)),
])
def test_the_rule_picks_the_measured_latent_shapes_of_the_shipped_configs(budget, resolution, channels, latent_shape):
    sizes = solve_sizes(budget, 10, resolution, channels)
    c, side = latent_shape
    assert (sizes.decoder_channels[0], sizes.latent_dim) == (c, c * side * side)
    assert 0.02 <= sizes.storage(10, resolution, channels).decoder_share <= 0.14  # a small decoder


def test_tiny_budgets_get_one_latent_channel_and_a_larger_decoder_share():
    tiny, large = solve_sizes(1, 10, 28, 1), solve_sizes(50, 10, 28, 1)
    assert tiny.decoder_channels[0] == 1 and tiny.latents_per_class >= 1
    assert tiny.storage(10, 28, 1).decoder_share > 3 * large.storage(10, 28, 1).decoder_share


def test_k_subtasks_pay_for_k_decoders():
    one, five = solve_sizes(10, 100, 32, 3, 1), solve_sizes(10, 100, 32, 3, 5)
    assert five.storage(100, 32, 3, 5).decoder_values == 5 * five.storage(100, 32, 3, 1).decoder_values
    assert five.storage(100, 32, 3, 5).decoder_values >= one.storage(100, 32, 3, 1).decoder_values


def test_1000_classes_at_64x64_are_solved_within_the_budget():
    sizes = solve_sizes(50, 1000, 64, 3, 1)
    assert 0.9 * 50 <= sizes.storage(1000, 64, 3).ipc_equivalent <= 50


@pytest.mark.parametrize("resolution, stages", [(28, 2), (32, 2), (64, 3), (14, 1), (48, 3), (30, 1), (128, 4)])
def test_the_stage_count_aims_for_a_start_side_of_8(resolution, stages):
    assert upsampling_stages(resolution, TARGET_START_SIDE) == stages
    assert len(solve_sizes(10, 10, resolution, 1).decoder_channels) == stages + 1


def test_decoder_widths_double_towards_the_latent():
    assert decoder_widths(16, 3) == [64, 32, 16]
    assert decoder_widths(8, 1) == [8]


def test_to_config_gives_the_config_names():
    sizes = solve_sizes(10, 10, 28, 1)
    assert sizes.to_config() == {
        "latents_per_class": sizes.latents_per_class, "latent_dim": sizes.latent_dim,
        "logvar_dim": sizes.logvar_dim, "decoder_channels": sizes.decoder_channels,
        "decoder_latent_projection": False, "decoder_upsample": "nearest",
    }


@pytest.mark.parametrize("args, message", [
    ((0, 10, 28, 1), "storage_budget_ipc=0 must be a positive"),
    ((float("nan"), 10, 28, 1), "storage_budget_ipc=nan"),
    ((10, 10, 28, 2), "channels=2 is not supported"),
    ((10, 10, 28, 1, 11), "num_subtasks=11 must be between 1 and the 10 classes"),
    ((10, 10, 27, 1), "resolution=27 cannot be reached"),
    ((10, 0, 28, 1), "num_classes=0"),
    ((10, 10, 28, 1, 1, "float32", "values", 64, 11), "label_top_k=11 must be None (whole labels) or 1 to num_classes"),
])
def test_bad_inputs_name_the_bad_value(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        solve_sizes(*args)


# ----------------------------------------------------------------------------------------------------------
# The config: a budget and no sizes, `sizes: auto`, explicit sizes
# ----------------------------------------------------------------------------------------------------------

DATA = {"resolution": 28, "channels": 1}


def test_a_budget_without_sizes_gets_the_solved_sizes():
    config = D3Config.from_dict({**DATA, "storage_budget_ipc": 2})
    assert config.representation.chosen_by_budget
    with pytest.raises(ValueError, match="resolve_sizes"):  # nothing builds before the class count is known
        build_decoder(config.representation, config.data)
    resolved = resolve_sizes(config, 10)
    solved = solve_sizes(2, 10, 28, 1).to_config()
    assert {k: getattr(resolved.representation, k) for k in solved} == solved
    report = planned_storage(resolved, plan_subtasks(list(range(10)), 1))
    assert 0.9 * 2 <= report.ipc_equivalent <= 2
    assert D3Config.from_dict(resolved.to_dict()) == resolved  # config.json of a run holds the chosen sizes


def test_k_subtasks_are_solved_with_k_decoders():
    resolved = resolve_sizes(D3Config.from_dict({**DATA, "storage_budget_ipc": 10, "num_subtasks": 2}), 10)
    assert planned_storage(resolved, plan_subtasks(list(range(10)), 2)).ipc_equivalent <= 10
    assert resolved.representation.latents_per_class == solve_sizes(10, 10, 28, 1, 2).latents_per_class


def test_explicit_sizes_win():
    # sizes given without `sizes: auto` are the run's sizes (the unset ones take the paper's defaults) ...
    config = D3Config.from_dict({**DATA, "storage_budget_ipc": 10, "latents_per_class": 3, "latent_dim": 32})
    assert not config.representation.chosen_by_budget and resolve_sizes(config, 10) == config
    assert config.representation.decoder_upsample == "transpose"
    # ... and with `sizes: auto`, each given size replaces the solver's pick
    config = D3Config.from_dict({**DATA, "storage_budget_ipc": 10, "sizes": "auto", "latents_per_class": 3})
    resolved = resolve_sizes(config, 10).representation
    assert resolved.latents_per_class == 3 and resolved.latent_dim == solve_sizes(10, 10, 28, 1).latent_dim
    # ... unless it cannot work with the chosen ones
    config = D3Config.from_dict({**DATA, "storage_budget_ipc": 10, "sizes": "auto", "latent_dim": 100})
    with pytest.raises(ValueError, match=r"the sizes given with sizes=auto \({'latent_dim': 100}\) do not fit"):
        resolve_sizes(config, 10)


def test_sizes_auto_needs_a_budget():
    with pytest.raises(ValueError, match="sizes=auto chooses the sizes from the budget: give storage_budget_ipc"):
        D3Config.from_dict({"sizes": "auto"})
    with pytest.raises(ValueError, match="sizes='all' is not valid"):
        D3Config.from_dict({"sizes": "all"})


def test_a_budget_too_small_stops_before_any_work():
    config = parse_config(["--resolution", "28", "--channels", "1", "--storage_budget_ipc", "0.05"])
    with pytest.raises(ValueError) as error:
        resolve_sizes(config, 10)
    smallest = float(SMALLEST_BUDGET.search(str(error.value)).group(1))
    config = parse_config(["--resolution", "28", "--channels", "1", "--storage_budget_ipc", str(smallest)])
    assert resolve_sizes(config, 10).representation.latents_per_class >= 1


def test_the_plan_recipe_prints_the_sizes_and_the_storage():
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "plan.py"
    run = subprocess.run([sys.executable, str(recipe), "--resolution", "32", "--channels", "3", "--num_classes", "10",
                          "--storage_budget_ipc", "2"], capture_output=True, text=True, check=True)
    sizes = solve_sizes(2, 10, 32, 3, max_decoder_width=CPU_DECODER_WIDTH)  # no config, no CUDA: the cpu preset
    assert "sizes chosen from the budget" in run.stdout
    assert f"latents_per_class: {sizes.latents_per_class}" in run.stdout
    assert f"decoder_channels: {sizes.decoder_channels}" in run.stdout
    assert f"= {sizes.storage(10, 32, 3).ipc_equivalent:.2f} IPC-equivalent (budget 2);" in run.stdout
    assert f"hard_label_weight {hard_label_weight_for(2):.2f} (chosen from the budget of 2)" in run.stdout


def test_the_plan_recipe_prints_a_budget_in_bytes_and_both_ipc_equivalents():
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "plan.py"
    run = subprocess.run([sys.executable, str(recipe), "--resolution", "28", "--channels", "1", "--num_classes", "10",
                          "--storage_budget_ipc", "10", "--budget_unit", "bytes", "--storage_dtype", "int8"],
                         capture_output=True, text=True, check=True)
    report = solve_sizes(10, 10, 28, 1, storage_dtype="int8", budget_unit="bytes",
                         max_decoder_width=CPU_DECODER_WIDTH).storage(10, 28, 1, 1, "int8")
    assert (f"storage in int8: {report.total_values:,} values = {report.ipc_equivalent:.2f} IPC-equivalent (budget "
            f"10 in bytes); {report.total_bytes:,} bytes = {report.ipc_equivalent_bytes:.2f} IPC-equivalent in bytes"
            in run.stdout)
    weight = hard_label_weight_for(report.ipc_equivalent)
    assert f"hard_label_weight {weight:.2f} (chosen from the storage)" in run.stdout


def test_explicit_sizes_over_a_budget_in_bytes_say_how_to_let_the_budget_choose():
    config = parse_config(["--resolution", "28", "--channels", "1", "--storage_budget_ipc", "1", "--budget_unit",
                           "bytes", "--storage_dtype", "float16", "--decoder_preset", "small"])
    with pytest.raises(ValueError, match=r"these sizes store [0-9,]+ bytes in float16 = [0-9.]+ IPC-equivalent in "
                                         r"bytes, over storage_budget_ipc=1\.0 .*--sizes auto"):
        planned_storage(config, plan_subtasks(list(range(10)), 1))


def test_a_run_given_only_a_budget(fmnist4_folder, tmp_path):
    settings = {k: v for k, v in TINY_RUN.items() if k not in PAPER_SIZES}
    config = D3Config.from_dict({**settings, "dataset": str(fmnist4_folder), "output_dir": str(tmp_path),
                                 "storage_budget_ipc": 4})
    result = run_distillation(config)
    sizes = solve_sizes(4, 4, 16, 1)  # fmnist4: 4 classes at 16x16x1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in sizes.to_config()} == sizes.to_config() and saved["sizes"] == "explicit"
    assert result.metrics.storage["ipc_equivalent"] == pytest.approx(sizes.storage(4, 16, 1).ipc_equivalent)
    assert 0.9 * 4 <= result.metrics.storage["ipc_equivalent"] <= 4
    # the labels too are chosen from the budget: each Gaussian's own class holds at least that weight
    assert saved["hard_label_weight"] == hard_label_weight_for(4) > 0
    store = result.pipeline.latent_store
    assert (store.soft_labels.gather(1, store.component_class[:, None]) >= hard_label_weight_for(4) - 1e-6).all()


def test_a_run_given_a_budget_in_bytes_saves_its_pipeline_in_the_storage_dtype(fmnist4_folder, tmp_path):
    settings = {k: v for k, v in TINY_RUN.items() if k not in PAPER_SIZES}
    config = D3Config.from_dict({**settings, "dataset": str(fmnist4_folder), "output_dir": str(tmp_path),
                                 "storage_budget_ipc": 4, "budget_unit": "bytes", "storage_dtype": "int8"})
    result = run_distillation(config)
    sizes = solve_sizes(4, 4, 16, 1, storage_dtype="int8", budget_unit="bytes")
    assert result.metrics.storage == sizes.storage(4, 16, 1, 1, "int8").to_dict()
    assert 0.9 * 4 <= result.metrics.storage["ipc_equivalent_bytes"] <= 4
    saved = D3Pipeline.from_pretrained(tmp_path / "pipeline")
    assert saved.decoder.config.storage_dtype == "int8" and saved.storage_report() == result.pipeline.storage_report()
    drawn = [pipe(generator=torch.Generator().manual_seed(0), output_type="pt").images
             for pipe in (saved, result.pipeline)]
    assert torch.equal(*drawn)  # the students learnt from what was saved



def test_a_run_with_top_k_labels_is_sized_for_them_and_saves_them(fmnist4_folder, tmp_path):
    settings = {k: v for k, v in TINY_RUN.items() if k not in PAPER_SIZES}
    config = D3Config.from_dict({**settings, "dataset": str(fmnist4_folder), "output_dir": str(tmp_path),
                                 "storage_budget_ipc": 4, "label_top_k": 2})
    result = run_distillation(config)
    sizes = solve_sizes(4, 4, 16, 1, label_top_k=2)
    assert result.metrics.storage == sizes.storage(4, 16, 1, 1, label_top_k=2).to_dict()
    saved = D3Pipeline.from_pretrained(tmp_path / "pipeline")
    assert saved.latent_store.config.label_top_k == 2
    assert saved.latent_store.soft_labels.gt(0).sum(1).max() <= 2  # the two largest of each label's four
    assert torch.equal(saved.latent_store.soft_labels, result.pipeline.latent_store.soft_labels)
