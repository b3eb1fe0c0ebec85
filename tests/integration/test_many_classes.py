"""As many classes as Tiny ImageNet (200), on a tiny stand-in: a run with 4 subtasks goes through to its pipeline,
cards and sample grid, and what it shows (the grid, the cards, the log) stays readable."""

from __future__ import annotations

import json
import logging
from logging.handlers import BufferingHandler
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN, write_parquet_dataset
from huggingface_hub import DatasetCard, ModelCard
from PIL import Image

from hf_d3 import D3Pipeline
from hf_d3.cards import render_pipeline_card
from hf_d3.config import D3Config
from hf_d3.hub import push_dataset_to_hub
from hf_d3.run import run_distillation
from hf_d3.sample_grid import GRID_MAX_CLASSES, grid_classes

NUM_CLASSES = 200
# Tiny ImageNet's longest class name: the grid's row names are as wide here as they will be there
CLASS_NAMES = [f"European fire salamander {c}" for c in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def many_classes_folder(tmp_path_factory) -> Path:
    """200 classes of 8x8 grayscale images, each class its own brightness under noise: 2 training images and 1 test
    image per class, as a local dataset folder (Parquet, Hub repo layout)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASS_NAMES)})

    def split(per_class: int) -> Dataset:
        labels = np.repeat(np.arange(NUM_CLASSES), per_class)
        images = (rng.random((len(labels), 8, 8)) * 55 + labels[:, None, None]).astype(np.uint8)
        return Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)

    return write_parquet_dataset(tmp_path_factory.mktemp("many_classes"), {"train": split(2), "test": split(1)})


@pytest.fixture(scope="module")
def many_classes_run(many_classes_folder, tmp_path_factory):
    """TINY_RUN at 8x8 on the 200 classes in 4 subtasks, in this process. Returns its output_dir, its result and
    what hf_d3 logged at INFO."""
    output_dir = tmp_path_factory.mktemp("many_classes_run")
    config = D3Config.from_dict({**TINY_RUN, "dataset": str(many_classes_folder), "output_dir": str(output_dir),
                                 "resolution": 8, "decoder_channels": [8, 8], "num_subtasks": 4})
    logger, log = logging.getLogger("hf_d3"), BufferingHandler(capacity=10_000)
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.INFO)
    try:
        result = run_distillation(config)
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)
    return output_dir, result, [record.getMessage() for record in log.buffer]


def test_a_run_of_200_classes_in_4_subtasks_completes(many_classes_run):
    output_dir, result, _ = many_classes_run
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert [s["classes"] for s in metrics["subtasks"]] == [list(range(k, k + 50)) for k in range(0, 200, 50)]
    pipe = D3Pipeline.from_pretrained(output_dir / "pipeline")
    assert pipe.latent_store.config.class_ids == list(range(NUM_CLASSES))
    assert pipe.latent_store.class_names == CLASS_NAMES
    assert len(pipe.decoder.generators) == 4 and pipe.latent_store.soft_labels.shape == (2 * NUM_CLASSES, NUM_CLASSES)
    assert result.metrics.storage["num_classes"] == NUM_CLASSES
    assert (output_dir / "samples.png").is_file()


def test_the_sample_grid_shows_20_evenly_spaced_classes_by_name(many_classes_run):
    output_dir, _, _ = many_classes_run
    shown = grid_classes(list(range(NUM_CLASSES)))
    assert len(shown) == GRID_MAX_CLASSES and shown[0] == 0 and shown[-1] == NUM_CLASSES - 1
    assert set(np.diff(shown)) <= {10, 11}  # evenly spaced
    grid = Image.open(output_dir / "samples.png")
    assert 20 * 60 <= grid.height < 20 * 120 and grid.width < 1200  # 20 rows of ~80 px images, not 200
    left = np.asarray(grid.convert("L"))[:, : grid.width // 5]  # the row names, left of the images
    assert (left < 100).any()


def test_the_pipeline_card_says_which_classes_its_grid_shows(many_classes_run):
    output_dir, result, _ = many_classes_run
    card = render_pipeline_card(result.pipeline, "user/d3-many-classes", samples_file="samples.png",
                                metrics=json.loads((output_dir / "metrics.json").read_text()),
                                settings=json.loads((output_dir / "config.json").read_text()))
    assert "one row for each of 20 of the 200 classes, evenly spaced" in card
    assert "200 classes" in ModelCard(card).text and "salamander" not in card  # the classes counted, not listed
    storage = result.pipeline.storage_report()
    assert storage.total_values >= 10_000 and f"{storage.total_values:,} values (" in card  # digits grouped


def test_the_dataset_card_does_not_list_the_classes_in_its_text(many_classes_run, local_hub, new_repo_id):
    _, result, _ = many_classes_run
    repo_id = new_repo_id("d3-many-classes")
    push_dataset_to_hub(result.pipeline, repo_id, "ipc1")
    card = DatasetCard.load(repo_id, repo_type="dataset")
    assert len(card.data.dataset_info["features"][1]["dtype"]["class_label"]["names"]) == NUM_CLASSES  # metadata
    assert "salamander" not in card.text


def test_the_log_folds_a_subtask_of_50_classes(many_classes_run):
    *_, messages = many_classes_run
    assert any(m.startswith("subtask 3 finished: classes [150-199],") for m in messages)
    assert max(len(m) for m in messages) < 400, max(messages, key=len)
