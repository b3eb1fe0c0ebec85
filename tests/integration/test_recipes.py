"""The recipes cannot run here at full size: each runs end to end with tiny iteration counts on a generated
stand-in dataset of the same image shape (at least 2 classes per subtask and 10 in all, the class count the
storage budgets of the CIFAR-10 / Fashion-MNIST configs assume), so their keys, decoder presets, latent sizes,
storage budgets and subtask counts are exercised for real."""

from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image

from hf_d3 import D3Pipeline
from hf_d3.config import D3Config
from hf_d3.config_parser import parse_config
from hf_d3.run import run_distillation
from hf_d3.sizing import resolve_sizes

RECIPES = sorted((Path(__file__).parents[2] / "recipes" / "configs").glob("*.yaml"))
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
    num_classes = max(10, 2 * parse_config(["--config", str(recipe)]).run.num_subtasks)
    config = resolve_sizes(parse_config(["--config", str(recipe)]), num_classes)  # a budget's sizes, if it has one
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


def test_paper_scale_shape_on_two_ranks_with_1000_classes(tmp_path):
    """ImageNet-64's shape end to end: 1,000 classes of 64x64 RGB, K=4 subtasks of 250 classes over two gloo ranks,
    two iterations each, the real images read from the image cache; only the counts are cut (2 images per class,
    narrow networks, short phases). `imagenet_64_ipc1.yaml` gives every other setting."""
    import json
    import os
    import subprocess
    import sys

    import yaml
    from hub_server import free_port

    recipe = Path(__file__).parents[2] / "recipes" / "configs" / "imagenet_64_ipc1.yaml"
    config = {**parse_config(["--config", str(recipe)]).to_dict(), **TINY,
              "dataset": stand_in_dataset(tmp_path, 1000, 64, 3, per_class=2), "test_split": "test",
              "output_dir": str(tmp_path / "run"), "num_subtasks": 4, "iterations": 2, "net_depth": 2,
              "mmd_samples_per_class": 2, "decoder_preset": None, "decoder_channels": [16, 8, 8, 8, 8, 8],
              "latent_dim": 8}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port("127.0.0.1")),
                           str(Path(__file__).parents[2] / "recipes" / "distill.py"),
                           "--config", str(tmp_path / "config.yaml")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert [len(s["classes"]) for s in metrics["subtasks"]] == [250] * 4
    assert all(s["iterations_run"] == 2 for s in metrics["subtasks"])
    pipe = D3Pipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert len(pipe.decoder.generators) == 4 and pipe.latent_store.mean.shape == (1000, 8)
    assert pipe(output_type="pt").images.shape[1:] == (3, 64, 64)
