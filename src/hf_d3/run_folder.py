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
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import staged, write_json
from .cards import sample_grid
from .config import D3Config, DistillationConfig
from .distill.checkpoint import PROGRESS_FILE, has_checkpoint
from .hub import push_dataset_to_hub
from .models.decoder import D3Decoder
from .models.latent_store import GaussianLatentStore
from .pipelines.pipeline_d3 import D3Pipeline
from .results import RunMetrics, SubtaskStats

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


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
        """Whether subtask `k` was finished by some run (its `done.json`, written last)."""
        return (self.subtask(k) / "done.json").is_file()

    def is_finished(self, k: int, distillation: DistillationConfig) -> bool:
        """Whether subtask `k` is done as far as `distillation` asks: finished, and its last checkpoint ran the
        iterations (or the time) asked for. A config that asks for more continues it from that checkpoint."""
        if not self.is_done(k):
            return False
        if not has_checkpoint(self.checkpoint(k)):  # no state to continue from
            return True
        progress = json.loads((self.checkpoint(k) / PROGRESS_FILE).read_text())
        out_of_time = (distillation.max_distill_time_s is not None
                       and progress["iterations_wall_time_s"] >= distillation.max_distill_time_s)
        return progress["iterations_run"] >= distillation.iterations or out_of_time

    def save_subtask(self, k: int, store: GaussianLatentStore, decoder: D3Decoder, stats: SubtaskStats) -> None:
        """A finished subtask: its latent store and decoder, then `done.json` (its stats), each atomically."""
        with staged(self.subtask(k) / "latent_store") as staging:
            store.save_pretrained(staging)
        with staged(self.subtask(k) / "decoder") as staging:
            decoder.save_pretrained(staging)
        write_json(self.subtask(k) / "done.json", dataclasses.asdict(stats), indent=None)

    def load_subtask(self, k: int) -> tuple[GaussianLatentStore, D3Decoder, SubtaskStats]:
        """What `save_subtask` wrote."""
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
            sample_grid(pipe).save(staging, format="PNG")
        write_json(self.root / "config.json", config.to_dict())
        write_json(self.metrics, metrics.to_dict())


def publish_run(
    run_dir: str | os.PathLike,
    hub_model_id: str,
    hub_dataset_id: str | None = None,
    *,
    token: str | None = None,
    private: bool = False,
) -> dict[str, CommitInfo]:
    """Publish a finished run folder (`pipeline/`, `metrics.json`, `config.json`, `samples.png`): the pipeline
    to `hub_model_id` and, if given, its materialised dataset to `hub_dataset_id` under config `ipc<N>`
    (`budget_config_name`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise ValueError(f"{run_dir} is not a finished run: metrics.json is missing (did the run fail?)")
    pipe = D3Pipeline.from_pretrained(run_dir / "pipeline")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    settings = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else None
    samples = run_dir / "samples.png"
    commits = {"pipeline": pipe.push_to_hub(
        hub_model_id, metrics=metrics, settings=settings, token=token, private=private,
        samples_png=samples if samples.is_file() else None,
    )}
    if hub_dataset_id:
        commits["dataset"] = push_dataset_to_hub(
            pipe, hub_dataset_id, config_name=budget_config_name(pipe, settings), token=token, private=private,
            source_dataset=(settings or {}).get("dataset"), pipeline_repo_id=commits["pipeline"].repo_url.repo_id)
    return commits


def budget_config_name(pipe: D3Pipeline, settings: dict | None) -> str:
    """The Hub dataset config a run's set goes under: `ipc<budget>` (`storage_budget_ipc`, else the storage it
    takes), e.g. "ipc10", "ipc0_41": rounding to a whole number would name a 0.41 IPC-equivalent set "ipc0"."""
    budget = (settings or {}).get("storage_budget_ipc") or pipe.storage_report().ipc_equivalent
    return f"ipc{round(budget, 2):g}".replace(".", "_")
