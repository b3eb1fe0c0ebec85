"""What a run checks before any long work and before it writes or withdraws anything: the output folder, the
dataset's labels, test split and images, the teacher, the Hub target, and what an earlier run left in the folder.

Each failure names the bad value and what would be valid. The checks run on every rank (each has its own disk);
if one fails anywhere, every rank raises, so none waits for a peer that has stopped.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
from datasets import Image

from .data import FASHION_MNIST, ImageCache, find_columns, load_split
from .distill.checkpoint import has_checkpoint
from .experts import TRAINING_SETTINGS_KEY
from .factories import build_decoder, build_latent_store, build_net
from .federated import expert_settings, gather_to_all, subtasks_of_rank
from .hub import RepoTakenError, check_pipeline_repo
from .teacher import teacher_settings

if TYPE_CHECKING:
    from datasets import Dataset

    from .config import D3Config, DataConfig, HubConfig
    from .run_folder import RunFolder

logger = logging.getLogger(__name__)

GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
EXPERT_KEYS = ("model_type", "num_labels", "num_channels", "image_size", "width", "depth")


def check_run_input(config: D3Config, folder: RunFolder, train: Dataset | ImageCache, class_names: list[str],
                    plan: list[list[int]], rank: int = 0, world_size: int = 1) -> None:
    """Every check of a run's input, on every rank; the sizes must be resolved (`hf_d3.sizing.resolve_sizes`)."""

    def checks() -> None:
        check_output_dir(folder.root)
        check_dataset(config.data, train, class_names)
        check_teacher(config.relabel.teacher, config.data, len(class_names))
        check_earlier_work(config, folder, plan, class_names, subtasks_of_rank(len(plan), rank, world_size))
        if rank == 0:
            check_hub(config.hub)

    on_every_rank(checks)


def on_every_rank(check: Callable[[], None]) -> None:
    """Run `check` on every rank: the rank where it fails raises its own error, every other rank a RuntimeError
    that names it."""
    try:
        check()
        error = None
    except Exception as failure:  # sent to the other ranks, then raised here
        error = failure
    messages = gather_to_all(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [f"rank {rank}: {message}" for rank, message in enumerate(messages) if message is not None]
    if failed:
        raise RuntimeError("the run did not start, another rank refused its input:\n" + "\n".join(failed))


def check_output_dir(root: Path) -> None:
    """`output_dir` must be a folder this process can create and write (each rank writes its own)."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"output_dir={str(root)!r} is a file; valid: a folder, new or an earlier run's")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as error:
        raise ValueError(f"output_dir={str(root)!r} cannot be written ({error.strerror}: {error.filename}); "
                         "valid: a folder this process can create and write") from error


def _check_labels(labels: np.ndarray, class_names: list[str], split: str) -> None:
    outside = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if outside.size:
        row = outside[0]
        raise ValueError(f"{outside.size} label(s) of split {split!r} are not class ids (row {row}: label "
                         f"{labels[row]}; -1 marks a missing label); valid: ids 0 to {len(class_names) - 1} of "
                         f"{class_names}: drop the unlabelled rows first")


def check_dataset(data: DataConfig, train: Dataset | ImageCache, class_names: list[str]) -> None:
    """Labels that are class ids, a training image of every class, a test split with the same classes, and (for
    `channels: 1`) grayscale images only."""
    if isinstance(train, ImageCache):  # a stream's cache (streaming: true): its columns were found as it was built
        labels = train.labels
    else:
        image_column, label_column = find_columns(train, data.image_column, data.label_column)
        labels = np.asarray(train[label_column])
    _check_labels(labels, class_names, data.train_split)
    counts = np.bincount(labels, minlength=len(class_names))
    empty = np.flatnonzero(counts == 0)
    if empty.size:  # one image is enough for init: random (tests/test_federated.py distils such a class); init: real
        listed = ", ".join(f"{c} {class_names[c]!r}" for c in empty[:10])  # needs more: the warm start checks it
        raise ValueError(f"{empty.size} class(es) of split {data.train_split!r} of dataset {data.dataset!r} have no "
                         f"image ({listed}); valid: at least one image of every class of the ClassLabel (or a "
                         "ClassLabel without the classes that have none)")
    try:
        test = load_split(data, data.test_split)
    except Exception as error:
        raise ValueError(f"test_split={data.test_split!r} of dataset {data.dataset!r} cannot be loaded "
                         f"({type(error).__name__}: {error}); valid: a split of that dataset") from error
    if isinstance(test, ImageCache):
        test_names = test.class_names
    else:
        test_image_column, test_label_column = find_columns(test, data.image_column, data.label_column)
        test_names = list(test.features[test_label_column].names)
    if test_names != class_names:
        raise ValueError(f"the classes of test_split={data.test_split!r}, {test_names}, are not those of "
                         f"train_split={data.train_split!r}, {class_names}; valid: the same ClassLabel names in "
                         "the same order")
    test_labels = test.labels if isinstance(test, ImageCache) else np.asarray(test[test_label_column])
    _check_labels(test_labels, class_names, data.test_split)
    # the builtin one is grayscale by construction; a stream is read once, into its cache, already converted
    if data.channels == 1 and data.dataset != FASHION_MNIST and not data.streaming:
        for split, dataset, column, split_labels in ((data.train_split, train, image_column, labels),
                                                     (data.test_split, test, test_image_column, test_labels)):
            _check_grayscale(dataset, column, split, split_labels, class_names)


def _check_grayscale(dataset: Dataset, column: str, split: str, labels: np.ndarray, class_names: list[str]) -> None:
    """Refuse colour images in a `channels: 1` run (converting them would drop their colour unasked). Reads only
    the image headers."""
    raw = dataset.cast_column(column, Image(decode=False)).select_columns([column])
    row = 0
    for batch in raw.iter(batch_size=1024):
        for item in batch[column]:
            where = f"image {row} of split {split!r} (class {labels[row]} {class_names[labels[row]]!r})"
            try:
                with PIL.Image.open(io.BytesIO(item["bytes"]) if item["bytes"] else item["path"]) as image:
                    mode = image.mode
            except Exception as error:
                raise ValueError(f"{where} cannot be read ({type(error).__name__}: {error})") from error
            if mode not in GRAY_MODES:
                raise ValueError(f"channels=1, but {where} is in colour (mode {mode}); valid: channels: 3, or "
                                 "grayscale images only (convert the dataset first to drop the colour on purpose)")
            row += 1


def check_teacher(teacher: str | None, data: DataConfig, num_classes: int) -> None:
    """A given `teacher` must be an image classifier of this dataset's classes and images (its config is read;
    its weights are loaded when it relabels)."""
    if not teacher:
        return
    from transformers import AutoConfig, AutoModelForImageClassification

    valid = (f"valid: a folder or Hub id of an image-classification checkpoint (AutoModelForImageClassification) "
             f"of {num_classes} classes")
    try:
        settings = AutoConfig.from_pretrained(teacher)
    except Exception as error:
        raise ValueError(f"teacher={teacher!r} is not a classifier checkpoint ({type(error).__name__}: {error}); "
                         f"{valid}") from error
    if type(settings) not in AutoModelForImageClassification._model_mapping:
        raise ValueError(f"teacher={teacher!r} is a {settings.model_type!r} checkpoint, not an image classifier; "
                         f"{valid}")
    expected = {"num_labels": num_classes, "num_channels": data.channels}
    if settings.model_type.startswith("d3_"):  # hf_d3's own networks are built for one image size
        expected["image_size"] = data.resolution
    differ = [f"{key}={getattr(settings, key)} (this run: {value})" for key, value in expected.items()
              if getattr(settings, key, value) != value]
    if differ:
        raise ValueError(f"teacher={teacher!r} does not fit this dataset: {', '.join(differ)}; {valid}, "
                         f"{data.channels} channel(s)")


def check_hub(hub: HubConfig) -> None:
    """With `push_to_hub`, a token, and a `hub_model_id` that is new or holds a D3 pipeline (the Hub is asked
    now, not after the run; if it cannot be reached, the publish at the end will say so)."""
    if not hub.push_to_hub:
        return
    from huggingface_hub import HfApi, get_token

    if not get_token():
        raise ValueError(f"push_to_hub needs a Hub token to publish hub_model_id={hub.hub_model_id!r}: set HF_TOKEN "
                         "or run `hf auth login`")
    if "/" not in hub.hub_model_id:
        return  # a bare name goes to the token owner's namespace, known once the repo is created
    try:
        check_pipeline_repo(HfApi(), hub.hub_model_id)
    except RepoTakenError:
        raise
    except Exception as error:  # offline now is no reason to refuse the run
        logger.warning("could not check hub_model_id=%r on the Hub now: %s", hub.hub_model_id, type(error).__name__)


def _differences(saved: Mapping[str, Any], built: Mapping[str, Any]) -> list[str]:
    return [f"{key}={saved.get(key)!r} there, {built.get(key)!r} here" for key in sorted({*saved, *built})
            if not key.startswith("_") and saved.get(key) != built.get(key)]


def check_earlier_work(config: D3Config, folder: RunFolder, plan: list[list[int]], class_names: list[str],
                       subtasks: list[int]) -> None:
    """What an earlier run left for `subtasks` (this rank's) is reused only if this config would have made it:
    finished subtasks and checkpoints of the same sizes, readable expert trajectories of the same networks, a
    trained teacher of the same settings."""
    for k in subtasks:
        saved = [("finished subtask", folder.subtask(k))] if folder.is_done(k) else []
        if not saved and has_checkpoint(folder.checkpoint(k)):
            saved.append(("checkpoint", folder.checkpoint(k)))
        for what, where in saved:
            built = {"latent_store": build_latent_store(config.representation, plan[k], class_names).config,
                     "decoder": build_decoder(config.representation, config.data).config}
            for name, settings in built.items():
                try:
                    differ = _differences(json.loads((where / name / "config.json").read_text()), settings)
                except (OSError, ValueError) as error:
                    differ = [f"unreadable {name}/config.json ({error})"]
                if differ:
                    raise ValueError(f"the {what} in {where} is of another run: {name} {'; '.join(differ)}; "
                                     f"valid: rerun with that run's settings, or delete {where} to distil subtask "
                                     f"{k} afresh")
        if folder.is_finished(k, config.distillation):
            continue  # its experts are not used again
        expected = None
        for i in range(config.experts.num_experts):
            if folder.expert(k, i).is_file():
                expected = expected or build_net(config.experts, config.data, len(plan[k])).config.to_dict()
                _check_expert(folder.expert(k, i), expected, config.experts.trajectory_epochs,
                              expert_settings(config, plan[k], k, i))
    saved_teacher = folder.teacher / "config.json"
    if not config.relabel.teacher and saved_teacher.is_file():
        # a teacher saved before its settings were recorded has none to compare
        settings = teacher_settings(config)
        if differ := _differences(json.loads(saved_teacher.read_text()).get(TRAINING_SETTINGS_KEY, settings), settings):
            raise ValueError(f"the teacher in {folder.teacher} is of another run: {'; '.join(differ)}; valid: rerun "
                             f"with that run's settings, or delete {folder.teacher} to train the teacher again")


def _check_expert(path: Path, expected: dict, epochs: int, settings: dict[str, Any]) -> None:
    from safetensors import safe_open

    remedy = f"delete {path} and {path.with_suffix('.json').name} beside it to train that expert again"
    try:
        with safe_open(str(path), "pt") as trajectory:
            keys = set(trajectory.keys())
        saved = json.loads(path.with_suffix(".json").read_text())
    except Exception as error:
        raise ValueError(f"the expert trajectory {path} is corrupt ({type(error).__name__}: {error}); valid: a "
                         f"complete trajectory: {remedy}") from error
    differ = _differences({k: saved.get(k) for k in EXPERT_KEYS}, {k: expected.get(k) for k in EXPERT_KEYS})
    differ += _differences(saved.get(TRAINING_SETTINGS_KEY, settings), settings)  # none saved by older versions
    if keys != {f"epoch_{e}" for e in range(epochs + 1)}:
        differ.insert(0, f"{len(keys) - 1} epochs there, trajectory_epochs={epochs} here")
    if differ:
        raise ValueError(f"the expert trajectory {path} is of another run: {'; '.join(differ)}; valid: rerun with "
                         f"that run's settings, or {remedy}")
