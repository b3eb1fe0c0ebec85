"""The layout of a run's `output_dir`, what in it marks work finished, and how the results are written.

    experts and subtasks   subtasks/subtask_<k>/experts/expert_<i>.safetensors (+ .json), warm_start.json,
                           checkpoint/, then latent_store/, decoder/ and done.json once the subtask is finished
    relabelling teacher    teacher/
    the result             pipeline/, samples.png, config.json, then metrics.json: a folder with metrics.json is
                           a finished run of that config
Every marker of finished work is written atomically (`hf_d3.atomic`), so a rerun trusts what it finds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from .atomic import staged, write_json
from .config import D3Config
from .models.decoder import D3Decoder
from .models.latent_store import GaussianLatentStore
from .pipelines.pipeline_d3 import D3Pipeline
from .results import RunMetrics, SubtaskStats


class RunFolder:
    """One run's `output_dir`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.teacher = self.root / "teacher"
        self.metrics = self.root / "metrics.json"

    def subtask(self, k: int) -> Path:
        return self.root / "subtasks" / f"subtask_{k}"

    def expert(self, k: int, i: int) -> Path:
        return self.subtask(k) / "experts" / f"expert_{i}.safetensors"

    def checkpoint(self, k: int) -> Path:
        return self.subtask(k) / "checkpoint"

    def warm_start(self, k: int) -> Path:
        return self.subtask(k) / "warm_start.json"

    def is_done(self, k: int) -> bool:
        return (self.subtask(k) / "done.json").is_file()

    def save_subtask(self, k: int, store: GaussianLatentStore, decoder: D3Decoder, stats: SubtaskStats) -> None:
        with staged(self.subtask(k) / "latent_store") as staging:
            store.save_pretrained(staging)
        with staged(self.subtask(k) / "decoder") as staging:
            decoder.save_pretrained(staging)
        write_json(self.subtask(k) / "done.json", dataclasses.asdict(stats), indent=None)

    def load_subtask(self, k: int) -> tuple[GaussianLatentStore, D3Decoder, SubtaskStats]:
        folder = self.subtask(k)
        return (GaussianLatentStore.from_pretrained(folder / "latent_store"),
                D3Decoder.from_pretrained(folder / "decoder"),
                SubtaskStats.from_dict(json.loads((folder / "done.json").read_text())))

    def start(self) -> None:
        """A run starts by withdrawing the old result's finished mark: it may be of another config."""
        self.metrics.unlink(missing_ok=True)

    def write_results(self, pipe: D3Pipeline, metrics: RunMetrics, config: D3Config) -> None:
        """`pipeline/`, `samples.png`, `config.json`, and last `metrics.json`, which marks the run finished."""
        with staged(self.root / "pipeline") as staging:
            pipe.save_pretrained(staging)
        with staged(self.root / "samples.png") as staging:
            save_sample_grid(pipe, staging)
        write_json(self.root / "config.json", config.to_dict())
        write_json(self.metrics, metrics.to_dict())


def save_sample_grid(pipe: D3Pipeline, path: Path, per_class: int = 8, seed: int = 0) -> None:
    """A PNG grid with one row per class: its mean images first, then samples."""
    m = pipe.latent_store.config.latents_per_class
    rows = []
    for c in pipe.latent_store.config.class_ids:
        out = pipe(class_labels=[c], include_means=True, num_samples_per_component=math.ceil(per_class / m),
                   generator=torch.Generator().manual_seed(seed))
        rows += out.images[:per_class]
    make_image_grid(rows, rows=len(pipe.latent_store.config.class_ids), cols=per_class).save(path, format="PNG")
