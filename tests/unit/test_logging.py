"""What a long job shows: progress bars on the local main process only, a `logging` logger per module, and the
distillation losses every `log_every` iterations, in the log and in Accelerate's trackers (TensorBoard here)."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from hub_server import free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hf_d3 import D3Decoder, GaussianLatentStore, build_classifier
from hf_d3.config import D3Config, RunConfig
from hf_d3.data import RealImages
from hf_d3.distill import distill_subtask
from hf_d3.experts import train_classifier
from hf_d3.run import run_distillation

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "hf_d3"
PROGRESS_MODULE = PACKAGE / "progress.py"
LONG_WORK = ["run", "federated", "experts", "distill/subtask", "distill/distiller", "distill/warm_start", "teacher",
             "evaluation"]

# ----------------------------------------------------------------------------------------------------------
# The settings
# ----------------------------------------------------------------------------------------------------------


def test_report_to_names_accelerate_trackers():
    assert RunConfig().trackers == [] and RunConfig().log_every == 10
    assert RunConfig(report_to="tensorboard").trackers == ["tensorboard"]
    assert RunConfig(report_to="tensorboard, wandb").trackers == ["tensorboard", "wandb"]
    assert RunConfig(report_to="all").trackers == ["all"]


@pytest.mark.parametrize("settings, message", [
    ({"report_to": "tensorbord"}, r"report_to='tensorbord': unknown tracker\(s\) \['tensorbord'\].*'tensorboard'"),
    ({"report_to": "tensorboard,none"}, r"unknown tracker\(s\) \['none'\]"),
    ({"log_every": 0}, r"log_every=0 is not valid; valid: >= 1"),
])
def test_bad_logging_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        D3Config.from_dict({**TINY_RUN, **settings})


# ----------------------------------------------------------------------------------------------------------
# The library's code: one way to draw a bar, one logger per module, no print
# ----------------------------------------------------------------------------------------------------------


def parsed_modules() -> dict[str, ast.Module]:
    return {p.relative_to(PACKAGE).with_suffix("").as_posix(): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def test_every_progress_bar_goes_through_progress_bar():
    for name, tree in parsed_modules().items():
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        if name != "progress":
            assert not {m for m in imported if m and m.split(".")[0] == "tqdm"}, f"{name} uses tqdm directly"


def test_long_work_has_a_logger_of_its_own_and_nothing_prints():
    modules = parsed_modules()
    for name in LONG_WORK:
        assert "logger = logging.getLogger(__name__)" in ast.unparse(modules[name]), name
    for name, tree in modules.items():
        calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
        assert not [call for call in calls if call.func.id == "print"], f"{name} prints; use its logger"


# ----------------------------------------------------------------------------------------------------------
# Progress bars on the local main process only
# ----------------------------------------------------------------------------------------------------------

# hf_d3/progress.py needs only accelerate and tqdm: loaded from its file, it spares each process the ~13 s that
# importing the whole package (transformers, diffusers) takes on a busy 2-core machine.
BAR_SCRIPT = """
import importlib.util, sys
from accelerate import PartialState
spec = importlib.util.spec_from_file_location("progress", sys.argv[1])
progress = importlib.util.module_from_spec(spec)
spec.loader.exec_module(progress)
state = PartialState(cpu=True)
print(f"rank {state.process_index} of {state.num_processes}, local rank {state.local_process_index}", flush=True)
for _ in progress.progress_bar(range(3), desc=f"bar of rank {state.process_index}"):
    pass
"""


def bar_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # bars on unless a test says otherwise
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_only_the_local_main_process_draws_progress_bars(tmp_path):
    script = tmp_path / "bars.py"
    script.write_text(BAR_SCRIPT)
    # two real gloo ranks on CPU (`--cpu --num_processes 2` would start one process)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port("127.0.0.1")), str(script), str(PROGRESS_MODULE)]
    run = subprocess.run(command, env=bar_environment(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rank 0 of 2, local rank 0" in run.stdout and "rank 1 of 2, local rank 1" in run.stdout
    assert "bar of rank 0" in run.stderr and "3/3" in run.stderr
    assert "bar of rank 1" not in run.stderr


def test_tqdm_disable_still_hides_the_main_process_bar():
    code = (f"import importlib.util; spec = importlib.util.spec_from_file_location('p', {str(PROGRESS_MODULE)!r}); "
            "p = importlib.util.module_from_spec(spec); spec.loader.exec_module(p); "
            "print(p.progress_bar(range(2)).disable, p.progress_bar(range(2), disable=False).disable)")
    for env, expected in (({"TQDM_DISABLE": "1"}, "True False"), ({}, "False False")):
        run = subprocess.run([sys.executable, "-c", code], env=bar_environment(**env), capture_output=True, text=True,
                             timeout=120)
        assert run.stdout.split() == expected.split(), run.stderr


# ----------------------------------------------------------------------------------------------------------
# The losses every `log_every` iterations
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_and_trajectory(fmnist4_tensors):
    data = RealImages(fmnist4_tensors.images, fmnist4_tensors.labels, [0, 1, 2, 3])
    torch.manual_seed(0)
    net = build_classifier("convnet", num_channels=1, image_size=16, num_labels=4, width=8, depth=2)
    steps = train_classifier(net, data.images, data.labels, epochs=2, lr=0.01, batch_size=32,
                             generator=torch.Generator().manual_seed(0), augment=False)
    return data, (net, torch.stack(steps))


def distill_logged(data_and_trajectory, log_every: int, checkpoint_dir: Path | None = None, **overrides):
    """`distill_subtask` of the tiny config; returns its stats and every (iteration, losses) it passed to on_log."""
    data, trajectory = data_and_trajectory
    torch.manual_seed(0)
    store = GaussianLatentStore([0, 1, 2, 3], num_classes=4, latents_per_class=2, latent_dim=8)
    decoder = D3Decoder(latent_dim=8, resolution=16, out_channels=1, channels=[8, 8, 8])
    config, calls = D3Config.from_dict({**TINY_RUN, **overrides}).distillation, []
    stats = distill_subtask(store, decoder, data, [trajectory], config, torch.Generator().manual_seed(0),
                            checkpoint_dir=checkpoint_dir,
                            on_log=lambda i, losses: calls.append((i, losses)), log_every=log_every)
    return stats, calls


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_losses_are_reported_every_n_iterations_and_after_the_last(data_and_trajectory, tmp_path):
    stats, calls = distill_logged(data_and_trajectory, log_every=2, iterations=5, checkpoint_dir=tmp_path)
    history = stats.loss_history
    assert [i for i, _ in calls] == [2, 4, 5]
    for (i, losses), start in zip(calls, [0, 2, 4], strict=True):  # each the mean since the previous report
        assert losses.keys() == {"mtt", "mmd", "lr"}
        assert losses["mtt"] == pytest.approx(mean(history["mtt"][start:i]))
        assert losses["mmd"] == pytest.approx(mean(history["mmd"][start:i]))
    assert calls[-1][1]["lr"] == pytest.approx(stats.syn_lr)

    # resumed from its checkpoint after 5 iterations: only the new iterations are reported
    resumed, calls = distill_logged(data_and_trajectory, log_every=2, iterations=7, checkpoint_dir=tmp_path)
    assert [i for i, _ in calls] == [6, 7]
    assert calls[0][1]["mtt"] == pytest.approx(resumed.loss_history["mtt"][5])


def test_a_term_switched_off_is_not_reported(data_and_trajectory):
    _, calls = distill_logged(data_and_trajectory, log_every=1, iterations=2, mtt_weight=0.0)
    assert [(i, sorted(losses)) for i, losses in calls] == [(1, ["lr", "mmd"]), (2, ["lr", "mmd"])]


LOSS_LINE = re.compile(r"subtask (\d+), iteration (\d+): mtt=(\S+), mmd=(\S+), lr=(\S+)")


def test_losses_reach_the_log(tiny_run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hf_d3")
    run_distillation(tiny_run(output_dir=str(tmp_path), iterations=3, log_every=2))
    history = json.loads((tmp_path / "metrics.json").read_text())["subtasks"][0]["loss_history"]
    lines = [LOSS_LINE.fullmatch(r.getMessage()) for r in caplog.records if r.name == "hf_d3.run"]
    reported = [m.groups() for m in lines if m]
    assert [(int(k), int(i)) for k, i, *_ in reported] == [(0, 2), (0, 3)]
    for (_, i, mtt, mmd, _), start in zip(reported, [0, 2], strict=True):
        assert float(mtt) == pytest.approx(mean(history["mtt"][start:int(i)]), rel=1e-5)
        assert float(mmd) == pytest.approx(mean(history["mmd"][start:int(i)]), rel=1e-5)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    for phase in ("trained 2 epochs", "subtask 0 finished", "accuracy on the test split: teacher", "student 1/1"):
        assert phase in messages, phase


def test_losses_and_metrics_reach_tensorboard(tiny_run, tmp_path):
    result = run_distillation(tiny_run(output_dir=str(tmp_path), report_to="tensorboard", log_every=1))
    history = result.metrics.subtasks[0].loss_history
    logs = tmp_path / "logs" / "hf_d3"
    assert list(logs.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logs))
    events.Reload()
    scalars = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}
    assert set(scalars) == {"subtask_0/mtt", "subtask_0/mmd", "subtask_0/lr", "accuracy_mean", "accuracy_std",
                            "teacher_accuracy", "storage_ipc_equivalent"}
    for name in ("mtt", "mmd", "lr"):
        assert [e.step for e in scalars[f"subtask_0/{name}"]] == [1, 2]  # every iteration with log_every=1
    for name in ("mtt", "mmd"):
        assert [e.value for e in scalars[f"subtask_0/{name}"]] == pytest.approx(history[name], rel=1e-6)
    assert scalars["subtask_0/lr"][-1].value == pytest.approx(result.metrics.subtasks[0].syn_lr, rel=1e-6)
    assert scalars["accuracy_mean"][0].value == pytest.approx(result.metrics.accuracy_mean)
    assert scalars["teacher_accuracy"][0].value == pytest.approx(result.metrics.teacher_accuracy)
    assert scalars["storage_ipc_equivalent"][0].value == pytest.approx(result.metrics.storage["ipc_equivalent"])
