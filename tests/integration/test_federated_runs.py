"""Federated distillation in real multi-process runs of recipes/distill.py (`accelerate launch --multi_gpu
--num_processes 2` on CPU, gloo), and on two machines as docs/federated.md starts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FMNIST4_CLASSES, TINY_RUN, tiny_plan, write_parquet_dataset
from hub_server import free_port
from snippets import shell_commands

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore
from hf_d3.config import D3Config
from hf_d3.config_parser import parse_config
from hf_d3.experts import load_trajectory
from hf_d3.run import run_distillation

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "distill.py"
LAUNCH_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def assert_same_pipelines(one: Path, other: Path, atol: float = 1e-5) -> None:
    """The pipelines saved under two runs' output_dirs hold the same tensors (to `atol`)."""
    one, other = D3Pipeline.from_pretrained(one / "pipeline"), D3Pipeline.from_pretrained(other / "pipeline")
    for part in ("latent_store", "decoder"):
        a, b = getattr(one, part).state_dict(), getattr(other, part).state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.allclose(a[name].float(), b[name].float(), atol=atol, rtol=0), (part, name)


# ----------------------------------------------------------------------------------------------------------
# Real 2-process runs
# ----------------------------------------------------------------------------------------------------------


def launch_processes(config: dict, tmp_path: Path, num_processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` recipes/distill.py on CPU processes (gloo), as they must be started for two real gloo ranks
   ; returns the finished process with stdout and stderr together."""
    config_file = tmp_path / "launch.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, **LAUNCH_ENV, "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port("127.0.0.1")), str(RECIPE), "--config", str(config_file)]
    return subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=420)


@pytest.fixture(scope="module")
def two_process_run(fmnist4_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_processes")
    config = {**TINY_RUN, "dataset": str(fmnist4_folder), "num_subtasks": 2, "output_dir": str(tmp / "out")}
    run = launch_processes(config, tmp)
    assert run.returncode == 0, run.stdout[-5000:]
    return Path(config["output_dir"]), run.stdout


def stages_of(settings: dict):
    """The `RunPlan` of a tiny run of these flat settings: where its stages are."""
    return tiny_plan(D3Config.from_dict(settings))


def test_two_processes_each_distil_their_own_subtask(two_process_run, fmnist4_folder):
    output_dir, stdout = two_process_run
    plan = stages_of({**TINY_RUN, "dataset": str(fmnist4_folder), "num_subtasks": 2})
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["num_processes"] == 2  # the real world size: two gloo ranks, not two lone processes
    assert stdout.count("test accuracy") == 1  # only the main process reports
    assert [s["subtask"] for s in metrics["subtasks"]] == [0, 1]
    assert [s["classes"] for s in metrics["subtasks"]] == [[0, 1], [2, 3]]
    for k, classes in enumerate(([0, 1], [2, 3])):
        folder = plan.subtask_stages[k].folder(output_dir)
        assert GaussianLatentStore.from_pretrained(folder / "latent_store").config.class_ids == classes
        expert = json.loads((plan.experts[k][0].folder(output_dir) / "config.json").read_text())
        assert len(expert["id2label"]) == 2  # experts trained on the subtask's own 2 classes only


def test_the_aggregated_pipeline_holds_every_class(two_process_run, fmnist4_folder):
    output_dir, _ = two_process_run
    plan = stages_of({**TINY_RUN, "dataset": str(fmnist4_folder), "num_subtasks": 2})
    pipe = D3Pipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.latent_store.config.class_ids == [0, 1, 2, 3] and pipe.latent_store.class_names == FMNIST4_CLASSES
    assert len(pipe.decoder.generators) == 2 and list(pipe.latent_store.config.subtask_sizes) == [2, 2]
    out = pipe(num_samples_per_component=1, include_means=True, generator=torch.Generator().manual_seed(0))
    assert sorted(set(out.labels.tolist())) == [0, 1, 2, 3] and len(out.images) == 16
    assert out.images[0].size == (16, 16) and out.images[0].mode == "L"
    soft = pipe.latent_store.soft_labels
    assert torch.isfinite(soft).all() and torch.allclose(soft.sum(1), torch.ones(8), atol=1e-5)
    # each subtask's generator is the one its rank distilled
    for k in range(2):
        own = D3Decoder.from_pretrained(plan.subtask_stages[k].folder(output_dir) / "decoder").generators[0]
        for name, value in own.state_dict().items():
            assert torch.equal(pipe.decoder.generators[k].state_dict()[name], value), (k, name)


def test_one_and_two_processes_give_the_same_pipeline(two_process_run, tiny_run, tmp_path):
    output_dir, _ = two_process_run
    assert torch.get_num_threads() == 1  # as in each launched rank (conftest sets OMP_NUM_THREADS=1)
    run_distillation(tiny_run(num_subtasks=2, output_dir=str(tmp_path / "one")))
    assert_same_pipelines(tmp_path / "one", output_dir)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((output_dir / "metrics.json").read_text())
    def losses(metrics):
        return [v for s in metrics["subtasks"] for term in ("mtt", "mmd") for v in s["loss_history"][term]]

    assert len(losses(m1)) == 8 and losses(m1) == pytest.approx(losses(m2), rel=1e-5)
    assert m1["num_processes"] == 1


@pytest.fixture(scope="module")
def one_short_class_folder(fmnist4_splits, tmp_path_factory) -> Path:
    """fmnist4 with a single training image of class 3 (Dress): `init: real` with 2 images per component cannot
    start subtask 1 (classes 2-3), while subtask 0 is fine."""
    from datasets import load_dataset

    train = fmnist4_splits["train"]
    labels = list(train["label"])
    keep = [i for i, label in enumerate(labels) if label != 3] + [labels.index(3)]
    folder = write_parquet_dataset(tmp_path_factory.mktemp("short_class"),
                                   {"train": train.select(sorted(keep)), "test": fmnist4_splits["test"]})
    for split in ("train", "test"):
        load_dataset(str(folder), split=split)  # build the cache once, before two ranks read it
    return folder


@pytest.fixture(scope="module")
def failed_two_process_run(one_short_class_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("failed_run")
    config = {**TINY_RUN, "dataset": str(one_short_class_folder), "num_subtasks": 2, "init": "real",
              "init_images_per_component": 2, "output_dir": str(tmp / "out")}
    return Path(config["output_dir"]), launch_processes(config, tmp)


def test_a_failing_rank_fails_the_job_and_writes_nothing(failed_two_process_run, one_short_class_folder):
    output_dir, run = failed_two_process_run
    assert run.returncode != 0
    assert "1 rank(s) failed; nothing was aggregated" in run.stdout
    # only rank 1 failed, and the failure is that of subtask 1's classes: subtask 1 ran on rank 1 and not on rank 0
    assert "--- rank 1 ---" in run.stdout and "--- rank 0 ---" not in run.stdout
    assert "init=real needs 2 real images per class; some class of [2, 3] has fewer" in run.stdout
    for name in ("metrics.json", "pipeline", "samples.png", "config.json", "teacher"):
        assert not (output_dir / name).exists(), name
    plan = stages_of({**TINY_RUN, "dataset": str(one_short_class_folder), "num_subtasks": 2, "init": "real",
                      "init_images_per_component": 2})
    assert plan.subtask_stages[0].is_complete(output_dir)  # rank 0 finished its own subtask
    assert not plan.subtask_stages[1].is_complete(output_dir)
    assert plan.experts[1][0].is_complete(output_dir)  # rank 1 failed after its experts


@pytest.fixture(scope="module")
def rerun(failed_two_process_run, one_short_class_folder):
    """The failed run's output_dir rerun in this process with a config that works (init: random). Returns the
    run's config, the files that must have been reused with their mtimes before the rerun, and its result."""
    output_dir, _ = failed_two_process_run
    config = D3Config.from_dict({**TINY_RUN, "dataset": str(one_short_class_folder), "num_subtasks": 2,
                                 "init": "random", "output_dir": str(output_dir)})
    plan = tiny_plan(config)
    # subtask 0 distilled with init: real is of other settings than this rerun's: the experts are what it reuses
    kept = [plan.experts[k][0].folder(output_dir) / name for k in (0, 1) for name in ("stage.json",
                                                                                     "trajectory.safetensors")]
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    return config, mtimes, run_distillation(config)


def test_a_rerun_after_a_failure_reuses_what_finished(rerun):
    config, mtimes, result = rerun
    output_dir = Path(config.run.output_dir)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # not recomputed
    plan = tiny_plan(config)
    assert all(stage.is_complete(output_dir) for stage in plan.subtask_stages)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert [s["classes"] for s in metrics["subtasks"]] == [[0, 1], [2, 3]]
    assert D3Pipeline.from_pretrained(output_dir / "pipeline").latent_store.config.class_ids == [0, 1, 2, 3]
    assert result.pipeline.decoder.config.num_subtasks == 2
    assert plan.teacher.is_complete(output_dir)  # the global teacher, kept for the next rerun


def test_a_second_rerun_reloads_the_same_global_teacher(rerun):
    config, _, first = rerun
    weights = tiny_plan(config).teacher.folder(config.run.output_dir) / "model.safetensors"
    trained = weights.stat().st_mtime_ns
    second = run_distillation(config)
    assert weights.stat().st_mtime_ns == trained  # loaded, not trained again
    assert torch.allclose(second.pipeline.latent_store.soft_labels, first.pipeline.latent_store.soft_labels,
                          atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# More processes than subtasks: the spare rank trains experts
# ----------------------------------------------------------------------------------------------------------


def test_a_spare_rank_trains_experts_that_reach_the_distilling_rank(fmnist4_folder, tiny_run, tmp_path):
    config = {**TINY_RUN, "dataset": str(fmnist4_folder), "num_subtasks": 2, "num_experts": 2,
              "output_dir": str(tmp_path / "three")}
    run = launch_processes(config, tmp_path, num_processes=3)
    assert run.returncode == 0, run.stdout[-5000:]
    metrics = json.loads((tmp_path / "three" / "metrics.json").read_text())
    assert metrics["num_processes"] == 3
    # (subtask, expert) pairs per rank: rank 2 distils nothing but trains expert 1 of subtask 0
    assert [r["experts"] for r in metrics["experts_per_rank"]] == [[[0, 0], [1, 1]], [[1, 0]], [[0, 1]]]

    run_distillation(tiny_run(num_subtasks=2, num_experts=2, output_dir=str(tmp_path / "one")))
    plan = tiny_plan(tiny_run(num_subtasks=2, num_experts=2))  # the stages' keys do not depend on output_dir
    for k in range(2):
        for i in range(2):
            # the trajectory rank 2 sent equals the one a single process trains (one thread: bit-identical)
            sent, trained_here = (load_trajectory(plan.experts[k][i].folder(tmp_path / run))[1]
                                  for run in ("three", "one"))
            assert torch.equal(sent, trained_here)
    assert_same_pipelines(tmp_path / "one", tmp_path / "three")


# ----------------------------------------------------------------------------------------------------------
# Two machines of one process each, started by the commands of docs/federated.md
# ----------------------------------------------------------------------------------------------------------


def machine_launch(command: list[str], config_file: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """A command of the `two_machines` snippet as it runs here: `accelerate` from this interpreter, machine 0 at
    127.0.0.1:`port`, this repo's recipe and `config_file`. Returns the argument list and the snippet's variables."""
    variables = dict(arg.split("=", 1) for arg in command[:command.index("accelerate")])
    args = command[command.index("accelerate") + 1:]
    assert args[0] == "launch" and args.count("--config") == 1, command
    replace = {"10.0.0.1": "127.0.0.1", "29500": str(port), "recipes/distill.py": str(RECIPE),
               args[args.index("--config") + 1]: str(config_file)}
    assert set(replace) <= set(args), f"the snippet no longer has {set(replace) - set(args)}: update this test"
    return [sys.executable, "-m", "accelerate.commands.launch", *(replace.get(a, a) for a in args[1:])], variables


@pytest.fixture(scope="module")
def two_machine_run(fmnist4_folder, tmp_path_factory):
    """Both commands of the `two_machines` snippet, here at once: each "machine" with its own output_dir and image
    cache, as two machines that share no filesystem. Returns the machines' folders and outputs, and the settings the
    snippet gives (its config with its command-line overrides)."""
    tmp = tmp_path_factory.mktemp("two_machines")
    port, launches = free_port("127.0.0.1"), []
    for machine, command in enumerate(shell_commands("two_machines")):
        config_file = tmp / f"machine{machine}.yaml"
        config_file.write_text(yaml.safe_dump({**TINY_RUN, "dataset": str(fmnist4_folder),
                                               "output_dir": str(tmp / f"machine{machine}")}))
        args, variables = machine_launch(command, config_file, port)
        env = {**os.environ, **LAUNCH_ENV, **variables, "HF_D3_CACHE": str(tmp / f"cache{machine}")}
        with open(tmp / f"machine{machine}.log", "w") as log:
            launches.append((subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT), log.name))
    outputs = []
    for process, log in launches:
        returncode = process.wait(timeout=420)
        outputs.append(Path(log).read_text())
        assert returncode == 0, outputs[-1][-5000:]
    settings = parse_config(args[args.index(str(RECIPE)) + 1:])  # the last machine's: the same but for paths
    return [tmp / "machine0", tmp / "machine1"], outputs, settings


def test_two_machines_give_the_pipeline_one_process_gives(two_machine_run, tmp_path):
    (main, other), (main_output, other_output), settings = two_machine_run
    metrics = json.loads((main / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and [s["classes"] for s in metrics["subtasks"]] == [[0, 1], [2, 3]]
    assert "test accuracy" in main_output and "test accuracy" not in other_output
    # machine 1 keeps its own rank's stages on its own disk and writes nothing of the result
    plan = tiny_plan(settings)
    assert plan.subtask_stages[1].is_complete(other) and not plan.subtask_stages[1].is_complete(main)
    assert plan.subtask_stages[0].is_complete(main) and not plan.subtask_stages[0].is_complete(other)
    assert sorted(p.name for p in other.iterdir()) == ["experts", "subtasks"]
    # one process, the same settings: the same pipeline (one thread each, the same reduction order)
    run_distillation(D3Config.from_dict({**settings.to_dict(), "output_dir": str(tmp_path / "one")}))
    assert_same_pipelines(tmp_path / "one", main, atol=0)
