"""The recipes cannot run here at full size: each runs end to end with tiny iteration counts on a generated
stand-in dataset of the same image shape (at least 2 classes per subtask and 10 in all, the class count the
storage budgets of the CIFAR-10 / Fashion-MNIST configs assume), so their keys, decoder presets, latent sizes,
storage budgets and subtask counts are exercised for real."""

from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image

from hf_d3 import D3Pipeline
from hf_d3.config import D3Config, parse_config
from hf_d3.run import run_distillation

RECIPES = sorted((Path(__file__).parents[1] / "recipes" / "configs").glob("*.yaml"))
TINY = dict(num_experts=1, trajectory_epochs=3, max_start_epoch=1, expert_epochs=2, net_width=8, iterations=1,
            syn_steps=2, syn_batch_size=8, mmd_samples_per_class=3, teacher_epochs=1, eval_steps=2, eval_seeds=1,
            expert_batch_size=16, init_steps=2)


def stand_in_dataset(folder: Path, num_classes: int, resolution: int, channels: int, per_class: int = 4) -> str:
    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=num_classes)})
    shape = (resolution, resolution, 3) if channels == 3 else (resolution, resolution)
    for split in ("train", "test"):
        labels = np.repeat(np.arange(num_classes), per_class)
        images = list(rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8))
        Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features).to_parquet(
            str(folder / f"{split}-00000-of-00001.parquet"))
    return str(folder)


def test_every_paper_recipe_is_covered():
    assert {p.stem for p in RECIPES} >= {"imagenet_64_ipc1", "imagenet_64_ipc2", "imagenet_64_ipc10",
                                         "tinyimagenet_ipc1", "tinyimagenet_ipc10"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_stand_in_data(recipe, tmp_path):
    config = parse_config(["--config", str(recipe)])
    num_classes = max(10, 2 * config.run.num_subtasks)
    data, sizes = config.data, config.representation
    folder = stand_in_dataset(tmp_path, num_classes, data.resolution, data.channels,
                              per_class=max(4, sizes.latents_per_class))  # init: real fits one image per latent
    config = D3Config.from_dict({**config.to_dict(), "dataset": folder, "test_split": "test",
                                 "output_dir": str(tmp_path / "run"), **TINY})
    result = run_distillation(config)

    pipe = D3Pipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert len(pipe.decoder.generators) == config.run.num_subtasks
    assert pipe.latent_store.mean.shape == (num_classes * sizes.latents_per_class, sizes.latent_dim)
    assert pipe.decoder.config.channels == result.pipeline.decoder.config.channels
    images = pipe(output_type="pt").images
    assert images.shape[1:] == (data.channels, data.resolution, data.resolution)
