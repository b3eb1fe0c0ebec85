"""Bad input stops a run before any long work, with one message that names the bad value and what would be valid,
and leaves nothing that looks finished (a run folder is finished when it has metrics.json, a subtask when it has
done.json: `hf_d3.run_folder`).

Every refused run here runs under `refused`, which fails the test if expert training, distillation, teacher
training or evaluation starts, and if the output folder changes at all (an earlier result is not even withdrawn).
The bad input refused before any run starts is tested beside the module that refuses it (tests/unit: test_config,
test_data, test_pipeline, test_hub).
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import TINY_RUN, stage_folders, write_parquet_dataset
from datasets import Dataset
from huggingface_hub import HfApi

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore, build_classifier
from hf_d3.config import D3Config
from hf_d3.config_parser import load_yaml, parse_config
from hf_d3.experts import load_trajectory
from hf_d3.hub import RepoTakenError, push_pipeline_to_hub
from hf_d3.run import run_distillation

# huggingface_hub's plain-LFS upload (the path taken with HF_HUB_DISABLE_XET=1) passes `data=<file>` to httpx2.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

LONG_WORK = ("hf_d3.federated.train_expert", "hf_d3.distill.subtask.distill_subtask", "hf_d3.teacher.train_classifier",
             "hf_d3.run.evaluate_with_config")


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` (or `path` itself) with its mtime and size."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.stat().st_size) for p in files}


@pytest.fixture
def refused(monkeypatch):
    """`refused(config, pattern)`: the run raises a ValueError matching `pattern` before any long work, and its
    output_dir is left exactly as it was. Returns the message."""

    def long_work(*args, **kwargs):
        raise AssertionError("long work started before the bad input was refused")

    for name in LONG_WORK:
        monkeypatch.setattr(name, long_work)

    def check(config: D3Config, pattern: str) -> str:
        output_dir = Path(config.run.output_dir)
        before = snapshot(output_dir) if output_dir.exists() else {}
        with pytest.raises(ValueError, match=pattern) as error:
            run_distillation(config)
        assert (snapshot(output_dir) if output_dir.exists() else {}) == before
        return str(error.value)

    return check


@pytest.fixture(scope="module")
def finished_run(fmnist4_folder, tmp_path_factory) -> Path:
    """A finished tiny run (latents_per_class 2, trajectory_epochs 2, net_width 8)."""
    output_dir = tmp_path_factory.mktemp("finished")
    run_distillation(D3Config.from_dict({"dataset": str(fmnist4_folder), **TINY_RUN, "output_dir": str(output_dir)}))
    assert (output_dir / "metrics.json").is_file()
    return output_dir


def copy_of(finished_run: Path, tmp_path: Path, unfinish: bool = False) -> Path:
    """A copy of the finished run; with `unfinish`, its subtask as a killed run leaves it (experts, checkpoint)."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    if unfinish:
        (subtask,) = stage_folders(copy, "subtasks")
        (subtask / "stage.json").unlink()
        for name in ("latent_store", "decoder"):
            shutil.rmtree(subtask / name)
    return copy


def dataset_folder(tmp_path: Path, splits: dict, **replaced: Dataset) -> str:
    return str(write_parquet_dataset(tmp_path / "data", {**splits, **replaced}))


@contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (root only); yields whether it could be mounted."""
    path.mkdir()
    mounted = shutil.which("mount") and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                                       capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


# ----------------------------------------------------------------------------------------------------------
# Settings: YAML files and values
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("iterations: 2.5\n", r"iterations=2.5 \(float\) in .*run.yaml is not valid; valid: a value of type int$"),
    ("iterations: many\n", r"iterations='many' \(str\) in .*run.yaml is not valid; valid: a value of type int$"),
    ("decoder_channels: 8\n", r"decoder_channels=8 \(int\) .*valid: a value of type list\[int\] \| None"),
    ("expert_augment: maybe\n", r"expert_augment='maybe' \(str\) .*valid: a value of type bool"),
    ("teacher: 3\n", r"teacher=3 \(int\) .*valid: a value of type str \| None"),
], ids=["float-for-int", "word-for-int", "int-for-list", "word-for-bool", "int-for-path"])
def test_yaml_value_of_the_wrong_type(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_config(["--config", str(tmp_path / "run.yaml")])


@pytest.mark.parametrize("text, kind", [("- iterations: 3\n", "list"), ("iterations 3\n", "str")], ids=["list", "word"])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ValueError, match=f"run.yaml holds a YAML {kind}; valid: a mapping of settings"):
        load_yaml(tmp_path / "run.yaml")


def test_setting_of_the_wrong_type_from_python():
    with pytest.raises(ValueError, match=r"resolution='16' \(str\) is not valid; valid: a value of type int"):
        D3Config.from_dict({"resolution": "16"})


# ----------------------------------------------------------------------------------------------------------
# A disk that fills up while the run writes
# ----------------------------------------------------------------------------------------------------------


def test_disk_full_while_writing(tiny_run, tmp_path, monkeypatch):
    """A 32 KiB tmpfs (as root; else a checkpoint writer that fails with ENOSPC) holds the expert but not the
    checkpoint: the run stops saying what it could not write and what to do, leaves no partial file and nothing
    that looks finished, and a rerun with space reuses the expert."""
    with tmpfs(tmp_path / "disk", "size=32k") as mounted:
        if not mounted:
            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr("hf_d3.distill.checkpoint.save_file", full)
        output_dir = tmp_path / "disk" / "run"
        with pytest.raises((OSError, RuntimeError)) as error:
            run_distillation(tiny_run(output_dir=str(output_dir)))
        assert (re.search(f"no space left on the device to write {output_dir}/subtasks/subtask0-\\w+/checkpoint",
                          str(error.value))
                and "free some space or choose another output_dir, then rerun" in str(error.value))
        files = [p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*") if p.is_file()]
        assert not [f for f in files if f.startswith("subtasks") and f.endswith("stage.json")], files
        assert not [f for f in files if f.endswith("metrics.json") or ".partial-" in f], files
        (expert,) = stage_folders(output_dir, "experts")
        assert load_trajectory(expert)[1].shape[0] == TINY_RUN["trajectory_epochs"] + 1  # complete, reusable
        shutil.copytree(output_dir, tmp_path / "bigger")
    monkeypatch.undo()
    monkeypatch.setattr("hf_d3.federated.train_expert", lambda *a, **k: pytest.fail("the expert was trained again"))
    run_distillation(tiny_run(output_dir=str(tmp_path / "bigger")))
    assert (tmp_path / "bigger" / "metrics.json").is_file()


# ----------------------------------------------------------------------------------------------------------
# The Hub (an invalid repo id, no token, a wrong token: tests/unit/test_hub.py)
# ----------------------------------------------------------------------------------------------------------


def test_a_hub_model_id_taken_by_another_kind_of_model(local_hub, new_repo_id, tiny_run, tmp_path, refused):
    """Publishing there added D3 files to someone's classifier and replaced its card; now nothing is uploaded,
    and a run that would publish there stops before it starts. (A dataset repo of the same id is another repo, as
    on the real Hub: tests/contracts/test_safety.py publishes one beside its pipeline.)"""
    repo_id = new_repo_id("classifier")
    build_classifier("convnet", 1, 16, 4, width=8, depth=2).save_pretrained(tmp_path / "classifier")
    HfApi().create_repo(repo_id)
    HfApi().upload_folder(repo_id=repo_id, folder_path=tmp_path / "classifier")
    commits, files = local_hub.commit_ids(repo_id), local_hub.files(repo_id)
    store = GaussianLatentStore(class_ids=[0, 1, 2, 3], num_classes=4, latents_per_class=2, latent_dim=8)
    pipe = D3Pipeline(latent_store=store, decoder=D3Decoder(latent_dim=8, resolution=16, out_channels=1,
                                                            channels=[8, 8, 8]))
    message = (f"the Hub repo '{repo_id}' already holds another model \\(no model_index.json; files "
               r"\['.gitattributes', 'config.json', 'model.safetensors'\]\); valid: a new repo id, or one that holds")
    with pytest.raises(RepoTakenError, match=message):
        push_pipeline_to_hub(pipe, repo_id)
    assert local_hub.commit_ids(repo_id) == commits and local_hub.files(repo_id) == files
    refused(tiny_run(push_to_hub=True, hub_model_id=repo_id, output_dir=str(tmp_path / "out")), message)


def test_push_to_hub_without_a_token(tiny_run, tmp_path, refused, monkeypatch):
    """It failed after the whole run, when it published."""
    monkeypatch.delenv("HF_TOKEN")
    refused(tiny_run(push_to_hub=True, hub_model_id="me/d3", output_dir=str(tmp_path / "out")),
            "push_to_hub needs a Hub token to publish hub_model_id='me/d3': set HF_TOKEN or run `hf auth login`")
