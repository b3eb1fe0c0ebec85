"""A run survives SIGKILL anywhere and a dead peer: rerun the same command and the result is that of an
uninterrupted run, and nothing that looks finished is ever incomplete (`hf_d3.atomic.kill_point`).

Killed runs are forked from this process (a real process that dies by SIGKILL, without the seconds of imports
a fresh interpreter costs); the dead peer is one of two real gloo ranks of recipes/distill.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RUN, stage_folders, tiny_plan
from hub_server import free_port
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from hf_d3 import D3Pipeline, atomic
from hf_d3.config import D3Config
from hf_d3.distill.subtask import load_subtask
from hf_d3.experts import load_trajectory
from hf_d3.run import run_distillation
from hf_d3.run_folder import RunFolder

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "distill.py"
# Two subtasks, a warm start, and a checkpoint every 2 of 3 iterations: every kind of finished work on disk.
SETTINGS = {**TINY_RUN, "num_subtasks": 2, "init": "real", "iterations": 3, "checkpoint_every": 2}

# Where each run of the chain is killed (`<kill point>:<n>`: the n-th time this process reaches it), and what it
# was doing; the run after the last one completes. Each rerun resumes from what the killed ones left.
KILL_CHAIN = [
    ("epoch:1", "training subtask 0's expert"),
    ("write trajectory.safetensors:2", "writing subtask 1's expert (subtask 0's was just written)"),
    ("warm start step:3", "the warm start of subtask 0"),
    ("write checkpoint:1", "writing subtask 0's first checkpoint, after its warm start"),
    ("iteration:1", "between iterations 1 and 2, the last checkpoint at 0"),
    ("iteration:2", "between iterations 2 and 3, just after the checkpoint at 2"),
    ("write stage.json:1", "finishing subtask 0: its latents and decoder written, its stage.json not yet"),
    ("write decoder:2", "finishing subtask 1 (subtask 0 completed from its last checkpoint)"),
    ("epoch:1", "training the relabelling teacher"),
    ("write <teacher folder>:1", "writing the teacher"),
    ("write pipeline:1", "writing the pipeline, after evaluation"),
    ("write metrics.json:1", "writing metrics.json, the pipeline, samples and config already written"),
]


def config_of(output_dir: Path, dataset: Path, **overrides) -> dict:
    return {**SETTINGS, "dataset": str(dataset), "output_dir": str(output_dir), **overrides}


def _run(config: dict, kill_at: str | None) -> None:
    if kill_at:
        os.environ["HF_D3_KILL_AT"] = kill_at
    run_distillation(D3Config.from_dict(config))


def run_forked(config: dict, kill_at: str | None = None) -> int:
    """The exit code of a run in a forked process (-9: killed), killed at `kill_at` if given."""
    process = multiprocessing.get_context("fork").Process(target=_run, args=(config, kill_at))
    process.start()
    process.join(timeout=300)
    if process.exitcode is None:
        process.kill()
        pytest.fail(f"the run killed at {kill_at} did not finish in 300 s")
    return process.exitcode


def check_finished_is_complete(root: Path, num_subtasks: int = 2) -> list[str]:
    """Load everything that a marker says is finished; returns what it found, e.g. ["subtask 0", "metrics"]."""
    folder, found = RunFolder(root), []
    if folder.metrics.is_file():
        assert json.loads(folder.metrics.read_text())["accuracy_mean"] >= 0
        D3Pipeline.from_pretrained(root / "pipeline")
        json.loads((root / "config.json").read_text())
        Image.open(root / "samples.png").load()
        found.append("metrics")
    for teacher in stage_folders(root, "teacher"):
        AutoModelForImageClassification.from_pretrained(teacher)
        found.append("teacher")
    for subtask in stage_folders(root, "subtasks"):
        load_subtask(subtask)
        found.append(f"subtask {subtask.name[len('subtask')]}")
    for checkpoint in sorted(root.glob("subtasks/*/checkpoint")):  # appears whole (progress.json is written last)
        assert json.loads((checkpoint / "progress.json").read_text())["iterations_run"] >= 0
        load_file(checkpoint / "state.safetensors")
        found.append(f"checkpoint {checkpoint.parent.name[len('subtask')]}")
    for warm_start in root.glob("subtasks/*/warm_start.json"):
        json.loads(warm_start.read_text())
    for expert in stage_folders(root, "experts"):
        _, trajectory = load_trajectory(expert)  # its config.json beside it, and every epoch
        assert len(trajectory) == TINY_RUN["trajectory_epochs"] + 1
        found.append(f"expert {expert.name[len('subtask')]}")
    assert len({f for f in found if f.startswith("subtask")}) <= num_subtasks
    return found


def assert_same_result(root: Path, reference: Path, exact: bool = True) -> None:
    one, other = (D3Pipeline.from_pretrained(r / "pipeline") for r in (root, reference))
    for part in ("latent_store", "decoder"):
        a, b = getattr(one, part).state_dict(), getattr(other, part).state_dict()
        assert a.keys() == b.keys()
        for name in a:
            same = torch.equal(a[name], b[name]) if exact else torch.allclose(a[name].float(), b[name].float(),
                                                                                atol=1e-5, rtol=0)
            assert same, (part, name)
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (root, reference))
    for key in ("accuracy_mean", "accuracy_std", "teacher_accuracy", "accuracies"):
        if key in m2:
            assert m1[key] == pytest.approx(m2[key], abs=0 if exact else 1e-6), key
    def losses(metrics):
        return [v for s in metrics["subtasks"] for term in ("mtt", "mmd") for v in s["loss_history"][term]]

    assert len(losses(m1)) == 2 * 2 * SETTINGS["iterations"]
    assert losses(m1) == pytest.approx(losses(m2), rel=0 if exact else 1e-5)


@pytest.fixture(scope="module")
def reference(fmnist4_folder, tmp_path_factory) -> Path:
    """An uninterrupted run, in this process (one thread: conftest sets OMP_NUM_THREADS=1)."""
    root = tmp_path_factory.mktemp("uninterrupted") / "out"
    run_distillation(D3Config.from_dict(config_of(root, fmnist4_folder)))
    return root


def test_killed_anywhere_a_rerun_gives_the_uninterrupted_result(reference, fmnist4_folder, tmp_path):
    config = config_of(tmp_path / "out", fmnist4_folder)
    teacher_folder = tiny_plan(D3Config.from_dict(config)).teacher.folder(tmp_path / "out").name
    seen = set()
    for kill_at, doing in KILL_CHAIN:
        kill_at = kill_at.replace("<teacher folder>", teacher_folder)
        assert run_forked(config, kill_at) == -signal.SIGKILL, f"the run was not killed at {kill_at} ({doing})"
        found = check_finished_is_complete(tmp_path / "out")
        assert "metrics" not in found, kill_at  # a killed run never looks finished
        if kill_at.startswith("write "):  # killed inside `staged`: the staged copy is there, not under its name
            assert list((tmp_path / "out").rglob(f"{kill_at[6:].rpartition(':')[0]}.partial-*")), kill_at
        seen |= set(found)
    assert seen == {"expert 0", "expert 1", "checkpoint 0", "checkpoint 1", "subtask 0", "subtask 1", "teacher"}
    assert (tmp_path / "out" / "pipeline").is_dir()  # the last kill: everything but metrics.json was written
    assert run_forked(config) == 0
    assert "metrics" in check_finished_is_complete(tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.partial-*"))  # what the killed runs left half-written is gone
    assert_same_result(tmp_path / "out", reference)

    # a rerun of the finished run withdraws metrics.json first: killed while rewriting samples, nothing looks finished
    assert run_forked(config, "write samples.png:1") == -signal.SIGKILL
    assert "metrics" not in check_finished_is_complete(tmp_path / "out")
    assert run_forked(config) == 0
    assert_same_result(tmp_path / "out", reference)


def test_kill_points_are_inert_unless_named(monkeypatch):
    kills = []
    for name in ("HF_D3_KILL_AT", "HF_D3_KILL_RANK", "HF_D3_KILL_SIGNAL", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setattr(atomic, "_reached", {})
    atomic.kill_point("iteration")  # no HF_D3_KILL_AT
    monkeypatch.setenv("HF_D3_KILL_AT", "iteration:2")
    atomic.kill_point("epoch")
    atomic.kill_point("iteration")
    assert kills == []
    atomic.kill_point("iteration")
    assert kills == [signal.SIGKILL]
    atomic.kill_point("iteration")  # only the n-th time
    monkeypatch.setattr(atomic, "_reached", {})
    monkeypatch.setenv("HF_D3_KILL_RANK", "1")  # another rank's kill: RANK is 0 here
    monkeypatch.setenv("HF_D3_KILL_SIGNAL", "SIGSTOP")
    for _ in range(3):
        atomic.kill_point("iteration")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(atomic, "_reached", {})
    atomic.kill_point("iteration")
    atomic.kill_point("iteration")
    assert kills == [signal.SIGKILL, signal.SIGSTOP]


def test_a_killed_expert_write_leaves_no_finished_looking_expert(fmnist4_folder, tmp_path):
    # killed between the expert's config.json and its trajectory: the config alone does not mark it trained
    config = config_of(tmp_path / "out", fmnist4_folder, num_subtasks=1)
    assert run_forked(config, "write trajectory.safetensors:1") == -signal.SIGKILL
    expert = tiny_plan(D3Config.from_dict(config)).experts[0][0].folder(tmp_path / "out")
    assert (expert / "config.json").is_file() and not (expert / "trajectory.safetensors").exists()
    assert check_finished_is_complete(tmp_path / "out", num_subtasks=1) == []


# ----------------------------------------------------------------------------------------------------------
# A dead or hung peer: two real gloo ranks of recipes/distill.py, rank 1 killed (SIGKILL) or frozen (SIGSTOP)
# mid-distillation
# ----------------------------------------------------------------------------------------------------------

COLLECTIVE_TIMEOUT_S = 20


def launch_ranks(config: dict, tmp_path: Path, kill_at: str, kill_rank: int, signal_name: str) -> list:
    """recipes/distill.py as two ranks started directly (as on two machines: no launcher to stop the survivor)."""
    config_file = tmp_path / "ranks.yaml"
    config_file.write_text(yaml.safe_dump(config))
    port = str(free_port("127.0.0.1"))
    ranks = []
    for rank in range(2):
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "HF_D3_KILL_AT": kill_at, "HF_D3_KILL_RANK": str(kill_rank), "HF_D3_KILL_SIGNAL": signal_name}
        with (tmp_path / f"rank{rank}.log").open("w") as log:
            ranks.append(subprocess.Popen([sys.executable, str(RECIPE), "--config", str(config_file)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    return ranks


def stopped_or_exited(process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        return True
    try:
        return Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"
    except OSError:
        return process.poll() is not None


@pytest.fixture(scope="module", params=["SIGKILL", "SIGSTOP"])
def lost_peer_run(request, fmnist4_folder, tmp_path_factory):
    """Rank 1 killed (SIGKILL: its connections close) or frozen (SIGSTOP: they stay open, nothing answers) after
    its first iteration. Returns the config, the two processes, when rank 1 was lost and rank 0 exited, the logs."""
    tmp = tmp_path_factory.mktemp(f"lost_peer_{request.param}")
    config = config_of(tmp / "out", fmnist4_folder, collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    ranks = launch_ranks(config, tmp, kill_at="iteration:1", kill_rank=1, signal_name=request.param)
    lost = survivor_exit = None
    deadline = time.monotonic() + 400
    while survivor_exit is None and time.monotonic() < deadline:
        if lost is None and stopped_or_exited(ranks[1]):
            lost = time.monotonic()
        if ranks[0].poll() is not None:
            survivor_exit = time.monotonic()
        time.sleep(0.1)
    for process in ranks:
        if process.poll() is None:
            process.kill()
        process.wait()
    logs = [(tmp / f"rank{rank}.log").read_text() for rank in range(2)]
    return config, ranks, lost, survivor_exit, logs


def test_a_lost_peer_stops_the_survivor_in_bounded_time(lost_peer_run):
    config, ranks, lost, survivor_exit, logs = lost_peer_run
    assert "2 process(es)" in logs[0], logs[0][-3000:]  # two real ranks in one process group
    assert lost is not None and survivor_exit is not None, (logs[0][-3000:], logs[1][-3000:])
    assert ranks[1].returncode == -signal.SIGKILL, logs[1][-3000:]  # SIGKILLed by its hook, or by this test
    assert ranks[0].returncode not in (0, None), logs[0][-3000:]
    # the survivor finishes its own subtask, then stops at once (a dead peer's connection closes) or after
    # collective_timeout_s (a hung peer)
    assert survivor_exit - lost < COLLECTIVE_TIMEOUT_S + 30, (survivor_exit - lost, logs[0][-3000:])
    assert "PeerLostError" in logs[0] and "rank(s) [1] never reached it" in logs[0], logs[0][-3000:]
    output_dir = Path(config["output_dir"])
    for name in ("metrics.json", "pipeline", "samples.png", "config.json", "teacher"):
        assert not (output_dir / name).exists(), name  # nothing aggregated, saved or published
    plan = tiny_plan(D3Config.from_dict(config))
    assert plan.subtask_stages[0].is_complete(output_dir)  # the survivor's own subtask is kept
    assert not plan.subtask_stages[1].is_complete(output_dir)
    check_finished_is_complete(output_dir)


def test_a_rerun_after_a_lost_peer_resumes_from_the_finished_work(lost_peer_run, reference):
    config, *_ = lost_peer_run
    output_dir = Path(config["output_dir"])
    plan = tiny_plan(D3Config.from_dict(config))
    subtask = plan.subtask_stages[0].folder(output_dir)
    kept = [subtask / "stage.json", subtask / "decoder" / "config.json",
            *(plan.experts[k][0].folder(output_dir) / "trajectory.safetensors" for k in (0, 1))]
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    assert run_forked(config) == 0  # one process now: the subtasks are the same whatever the number of ranks
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes  # reused, not recomputed
    assert_same_result(output_dir, reference, exact=False)
