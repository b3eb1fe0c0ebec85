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
import json
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN, stage_folders, tiny_plan, write_parquet_dataset
from datasets import ClassLabel, Dataset, Features, Image, Value
from huggingface_hub import HfApi

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore, build_classifier
from hf_d3.config import D3Config, DataConfig
from hf_d3.config_parser import load_yaml, parse_config
from hf_d3.experts import load_trajectory
from hf_d3.hub import RepoTakenError, push_pipeline_to_hub
from hf_d3.preflight import check_dataset
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


@pytest.mark.parametrize("settings, message", [
    ({"eval_seeds": 0}, "eval_seeds=0 is not valid; valid: >= 1"),  # it wrote a metrics.json with a NaN accuracy
    ({"expert_batch_size": 0}, "expert_batch_size=0 is not valid; valid: >= 1"),
    ({"eval_lr": -0.01}, r"eval_lr=-0.01 is not valid; valid: > 0"),
    ({"mmd_bandwidths": [1.0, 0.0]}, r"mmd_bandwidths=\[1.0, 0.0\] is not valid; valid: > 0 \(every entry"),
    ({"hard_label_weight": 1.5}, "hard_label_weight=1.5 is not valid; valid: 0 to 1"),
], ids=["eval_seeds", "expert_batch_size", "eval_lr", "mmd_bandwidths", "hard_label_weight"])
def test_count_or_rate_out_of_range(settings, message):
    with pytest.raises(ValueError, match=message):
        D3Config.from_dict({**TINY_RUN, **settings})


def test_hub_repo_id_the_hub_would_refuse():
    """Refused with the settings, not after the run when it publishes."""
    with pytest.raises(ValueError, match=r"hub_model_id='me/not valid!' is not valid; valid: 'user/"):
        D3Config.from_dict({"push_to_hub": True, "hub_model_id": "me/not valid!"})


def test_more_subtasks_than_classes_in_the_yaml(fmnist4_folder, tmp_path, refused):
    settings = {"dataset": str(fmnist4_folder), **TINY_RUN, "num_subtasks": 5, "output_dir": str(tmp_path / "out")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    config = parse_config(["--config", str(tmp_path / "run.yaml")])
    refused(config, "num_subtasks=5 must be between 1 and the 4 classes")


# ----------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------


def test_string_labels(fmnist4_splits, tiny_run, tmp_path, refused):
    train = fmnist4_splits["train"]
    names = train.features["label"].names
    strings = Dataset.from_dict({"image": train["image"], "label": [names[label] for label in train["label"]]},
                                features=Features({"image": Image(), "label": Value("string")}))
    folder = dataset_folder(tmp_path, fmnist4_splits, train=strings)
    refused(tiny_run(dataset=folder, output_dir=str(tmp_path / "out")),
            r"no label column in the dataset; its columns are \{'image': 'Image', 'label': 'Value'\}; .*must be "
            r"cast to a ClassLabel first \(datasets: Dataset.class_encode_column")


def test_a_class_with_no_image(fmnist4_splits, tiny_run, tmp_path, refused):
    train = fmnist4_splits["train"]
    folder = dataset_folder(tmp_path, fmnist4_splits, train=train.filter(lambda row: row["label"] != 3))
    refused(tiny_run(dataset=folder, output_dir=str(tmp_path / "out")),
            r"1 class\(es\) of split 'train' of dataset .* have no image \(3 'Dress'\); valid: at least one image of "
            "every class")


def test_missing_labels(fmnist4_splits, tiny_run, tmp_path, refused):
    train = fmnist4_splits["train"]
    labels = list(train["label"])
    labels[5] = -1  # ClassLabel's "no label"
    folder = dataset_folder(tmp_path, fmnist4_splits, train=Dataset.from_dict(
        {"image": train["image"], "label": labels}, features=train.features))
    refused(tiny_run(dataset=folder, output_dir=str(tmp_path / "out")),
            r"1 label\(s\) of split 'train' are not class ids \(row 5: label -1; .*valid: ids 0 to 3 of")


def test_colour_images_in_a_grayscale_run(fmnist4_splits, tiny_run, tmp_path, refused):
    """A class list mixing grayscale and colour images with `channels: 1` (converting would drop the colour)."""
    train = fmnist4_splits["train"]
    images = [image.convert("RGB") if label == 2 else image for image, label in zip(train["image"], train["label"])]
    folder = dataset_folder(tmp_path, fmnist4_splits, train=Dataset.from_dict(
        {"image": images, "label": train["label"]}, features=train.features))
    refused(tiny_run(dataset=folder, channels=1, output_dir=str(tmp_path / "out")),
            r"channels=1, but image 48 of split 'train' \(class 2 'Pullover'\) is in colour \(mode RGB\); valid: "
            "channels: 3, or grayscale images only")


def test_an_image_that_cannot_be_read(fmnist4_splits, tiny_run, tmp_path, refused):
    test = fmnist4_splits["test"]
    images = [{"bytes": b"not a PNG", "path": None} if i == 7 else image for i, image in enumerate(test["image"])]
    folder = dataset_folder(tmp_path, fmnist4_splits, test=Dataset.from_dict(
        {"image": images, "label": test["label"]}, features=test.features))
    refused(tiny_run(dataset=folder, output_dir=str(tmp_path / "out")),
            r"image 7 of split 'test' \(class 0 'T-shirt/top'\) cannot be read \(UnidentifiedImageError")


def test_a_test_split_that_does_not_exist(tiny_run, tmp_path, refused):
    """It failed after the whole distillation, when the students were to be tested."""
    refused(tiny_run(test_split="validation", output_dir=str(tmp_path / "out")),
            r"test_split='validation' of dataset .* cannot be loaded \(ValueError: Unknown split \"validation\". "
            r"Should be one of \['train', 'test'\].\); valid: a split of that dataset")


def test_an_image_folder_without_class_sub_folders(tiny_run, tmp_path, refused):
    """Its images lie in the split folders: `datasets` reads the splits' names as classes and no labels (it failed
    with a TypeError comparing None)."""
    import numpy as np
    import PIL.Image

    for split in ("train", "test"):
        (tmp_path / "flat" / split).mkdir(parents=True)
        for i in range(4):
            PIL.Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(tmp_path / "flat" / split / f"{i}.png")
    refused(tiny_run(dataset=str(tmp_path / "flat"), output_dir=str(tmp_path / "out")),
            r"4 image\(s\) of split 'train' have no label \(row 0; the classes read are \['test', 'train'\]\); valid: "
            r"one sub-folder per class in every split folder \(<dataset>/train/<class name>/<image>.png\)")


def test_a_test_split_with_other_classes(fmnist4_folder, fmnist4_splits):
    renamed = fmnist4_splits["train"].cast_column("label", ClassLabel(names=["a", "b", "c", "d"]))
    with pytest.raises(ValueError, match=r"the classes of test_split='test', \['T-shirt/top', .*\], are not those "
                                         r"of train_split='train', \['a', 'b', 'c', 'd'\]; valid: the same ClassLabel"):
        check_dataset(DataConfig(dataset=str(fmnist4_folder)), renamed, ["a", "b", "c", "d"])


# ----------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pipeline", "text-model", "missing"])
def test_a_teacher_that_is_not_a_classifier(finished_run, tiny_run, tmp_path, refused, kind):
    """It failed after the whole distillation, when the teacher was to relabel."""
    from transformers import BertConfig

    teacher = {"pipeline": finished_run / "pipeline", "text-model": tmp_path / "bert", "missing": tmp_path / "none"}
    BertConfig(num_hidden_layers=1).save_pretrained(tmp_path / "bert")
    expected = {"pipeline": "is not a classifier checkpoint", "missing": "is not a classifier checkpoint",
                "text-model": "is a 'bert' checkpoint, not an image classifier"}[kind]
    refused(tiny_run(teacher=str(teacher[kind]), output_dir=str(tmp_path / "out")),
            f"teacher='{teacher[kind]}' {expected}.*; valid: a folder or Hub id of an image-classification "
            r"checkpoint \(AutoModelForImageClassification\) of 4 classes")


@pytest.mark.parametrize("net, message", [
    ((1, 16, 10), r"num_labels=10 \(this run: 4\)"),
    ((3, 16, 4), r"num_channels=3 \(this run: 1\)"),
    ((1, 28, 4), r"image_size=28 \(this run: 16\)"),
], ids=["num_labels", "num_channels", "image_size"])
def test_a_teacher_for_other_data(tiny_run, tmp_path, refused, net, message):
    channels, size, labels = net
    build_classifier("convnet", channels, size, labels, width=8, depth=2).save_pretrained(tmp_path / "teacher")
    refused(tiny_run(teacher=str(tmp_path / "teacher"), output_dir=str(tmp_path / "out")),
            f"teacher='{tmp_path / 'teacher'}' does not fit this dataset: {message}; valid: .* of 4 classes, 1 channel")


# ----------------------------------------------------------------------------------------------------------
# A pipeline folder (truncated weights, another pipeline class, missing files: tests/unit/test_pipeline.py)
# ----------------------------------------------------------------------------------------------------------


def test_a_pipeline_folder_whose_components_disagree(tmp_path):
    store = GaussianLatentStore(class_ids=[0, 1, 2], num_classes=3, latents_per_class=2, latent_dim=8)
    decoder = D3Decoder(latent_dim=8, resolution=8, out_channels=1, channels=[8, 8])
    D3Pipeline(latent_store=store, decoder=decoder).save_pretrained(tmp_path / "pipe")
    D3Decoder(latent_dim=8, resolution=8, out_channels=1, channels=[8, 8], num_subtasks=2).save_pretrained(
        tmp_path / "pipe" / "decoder")  # the decoder of a 2-subtask run
    with pytest.raises(OSError, match=f"could not load a D3Pipeline from {tmp_path / 'pipe'}: the latent store and "
                                      r"the decoder disagree: the store has 1 subtask\(s\) .* the decoder 2 generator"):
        D3Pipeline.from_pretrained(tmp_path / "pipe")


# ----------------------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------------------


def test_an_output_dir_that_is_a_file(tiny_run, tmp_path, refused):
    (tmp_path / "notes.txt").write_text("mine")
    refused(tiny_run(output_dir=str(tmp_path / "notes.txt")),
            f"output_dir='{tmp_path / 'notes.txt'}' is a file; valid: a folder, new or an earlier run's")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_output_dir_under_a_file(tiny_run, tmp_path, refused):
    """Not writable, honestly, as root too: a path whose parent is a file."""
    (tmp_path / "notes.txt").write_text("mine")
    refused(tiny_run(output_dir=str(tmp_path / "notes.txt" / "run")),
            rf"output_dir='{tmp_path / 'notes.txt' / 'run'}' cannot be written \(Not a directory: .*\); valid: a "
            "folder this process can create and write")


def test_an_output_dir_on_a_read_only_filesystem(tiny_run, tmp_path, refused):
    """Not writable for root either: a read-only tmpfs (mounting needs root; skipped otherwise)."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (not root)")
        refused(tiny_run(output_dir=str(tmp_path / "ro" / "run")),
                r"output_dir=.*ro/run' cannot be written \(Read-only file system: .*; valid: a folder this process")


# ----------------------------------------------------------------------------------------------------------
# What an earlier run left in the output folder
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# What an earlier run left in the output folder
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{"latents_per_class": 3}, {"trajectory_epochs": 3}, {"net_width": 16},
                                      {"expert_lr": 0.05}], ids=lambda settings: next(iter(settings)))
def test_a_rerun_with_other_settings_keeps_the_earlier_work_and_makes_its_own(finished_run, tiny_run, tmp_path,
                                                                           settings):
    """Each stage's folder is named by its settings: work of other settings is neither reused (a finished subtask
    of other sizes once was, under a config.json that claimed the new ones) nor refused, nor removed."""
    copy = copy_of(finished_run, tmp_path, unfinish=True)  # a checkpoint and experts of the first settings
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("stage.json")}
    config = tiny_run(output_dir=str(copy), **settings)
    run_distillation(config)
    plan = tiny_plan(config)
    assert all(stage.is_complete(copy) for stage in (*plan.experts[0], *plan.subtask_stages, plan.teacher))
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the first settings' stages, untouched
    saved = json.loads((copy / "config.json").read_text())
    assert {k: saved[k] for k in settings} == settings


def test_a_corrupt_expert_trajectory(finished_run, tiny_run, tmp_path, refused):
    """It failed after every other expert was trained, when the subtask loaded its trajectories."""
    copy = copy_of(finished_run, tmp_path, unfinish=True)
    (expert,) = stage_folders(copy, "experts")
    trajectory = expert / "trajectory.safetensors"
    trajectory.write_bytes(trajectory.read_bytes()[:1000])  # a truncated copy
    refused(tiny_run(output_dir=str(copy)),
            f"the expert trajectory in {expert} is corrupt \\(SafetensorError: .*\\); valid: a complete trajectory: "
            f"delete {expert} to train that expert again")


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
