"""What a run checks before any long work and before it writes or withdraws anything: the output folder, the
dataset's labels, test split and images, the teacher, the Hub target, and the
expert trajectories an earlier run left.

Each failure names the bad value and what would be valid. The checks run on every rank (each has its own disk);
if one fails anywhere, every rank raises, so none waits for a peer that has stopped.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
from datasets import Image

from .data import FASHION_MNIST, ImageCache, find_columns, load_split
from .experts import TRAJECTORY_FILE
from .federated import gather_to_all, subtasks_of_rank
from .hub import RepoTakenError, check_pipeline_repo

if TYPE_CHECKING:
    from datasets import Dataset

    from .config import D3Config, DataConfig, HubConfig
    from .run_plan import RunPlan

logger = logging.getLogger(__name__)

GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


def check_run_input(config: D3Config, plan: RunPlan, output_dir: Path, train: Dataset | ImageCache,
                    rank: int = 0, world_size: int = 1) -> None:
    """Every check of a run's input, on every rank."""

    def checks() -> None:
        check_output_dir(output_dir)
        check_dataset(config.data, train, plan.class_names)
        check_teacher(config.relabel.teacher, config.data, len(plan.class_names))
        check_earlier_experts(config, plan, subtasks_of_rank(len(plan.subtasks), rank, world_size))
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
    missing = np.flatnonzero(np.equal(labels, None))
    if missing.size:  # an image folder whose images lie in the split folders: its "classes" are the splits' names
        raise ValueError(f"{missing.size} image(s) of split {split!r} have no label (row {missing[0]}; the classes "
                         f"read are {class_names}); valid: one sub-folder per class in every split folder "
                         f"(<dataset>/{split}/<class name>/<image>.png), or a dataset with a ClassLabel column")
    labels = labels.astype(np.int64)
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
    # one image is enough for init: random (tests/integration/test_federated_runs.py distils such a class); init: real
    # needs more: the warm start checks it
    if empty.size:
        listed = ", ".join(f"{c} {class_names[c]!r}" for c in empty[:10])
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


def check_earlier_experts(config: D3Config, plan: RunPlan, subtasks: list[int]) -> None:
    """The complete expert stages that `subtasks` (this rank's) will read must be readable: a file damaged after it
    was written fails now, not after every other expert was trained."""
    from safetensors import safe_open

    for k in subtasks:
        if plan.subtask_stages[k].is_complete(plan.stage_dir):
            continue  # its experts are not read again
        for expert in plan.experts[k]:
            if not expert.is_complete(plan.stage_dir):
                continue
            folder = expert.folder(plan.stage_dir)
            try:
                with safe_open(str(folder / TRAJECTORY_FILE), "pt") as trajectory:
                    trajectory.keys()
            except Exception as error:
                raise ValueError(f"the expert trajectory in {folder} is corrupt ({type(error).__name__}: {error}); "
                                 f"valid: a complete trajectory: delete {folder} to train that expert again") from error
