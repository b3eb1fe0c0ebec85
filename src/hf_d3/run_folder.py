"""A run's `output_dir`: its result, how it is written, and how it is published.

    stage results          experts/, subtasks/, teacher/, evaluations/ (`hf_d3.stages`; under `stage_dir` if set)
    the result             pipeline/, samples.png, config.json, then metrics.json: a folder with metrics.json is
                           a finished run of that config
Every marker of finished work is written atomically (`hf_d3.atomic`), so a rerun trusts what it finds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import staged, write_json
from .hub import push_dataset_to_hub
from .pipelines.pipeline_d3 import D3Pipeline
from .results import RunMetrics
from .sample_grid import sample_grid

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


class RunFolder:
    """One run's `output_dir`: where its result is written."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.metrics = self.root / "metrics.json"

    def start(self) -> None:
        """A run starts by withdrawing the old result's finished mark: it may be of another config."""
        self.metrics.unlink(missing_ok=True)

    def write_results(self, pipe: D3Pipeline, metrics: RunMetrics, settings: dict[str, Any]) -> None:
        """`pipeline/`, `samples.png`, `config.json` (the run's `settings`), and last `metrics.json`, which marks the
        run finished."""
        with staged(self.root / "pipeline") as staging:
            pipe.save_pretrained(staging)
        with staged(self.root / "samples.png") as staging:
            sample_grid(pipe).save(staging, format="PNG")
        write_json(self.root / "config.json", settings)
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
