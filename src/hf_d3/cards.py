"""The cards of D3 repos: the pipeline's model card and the distilled dataset's card, from the Jinja templates in
`hf_d3/model_cards` (validated by parsing them back with huggingface_hub's `ModelCard` / `DatasetCard`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import yaml

from .results import CARD_METRICS
from .sample_grid import grid_classes

if TYPE_CHECKING:
    from .pipelines.pipeline_d3 import D3Pipeline

CITATION = """@article{qin2024distributional,
  title   = {Distributional Dataset Distillation with Subtask Decomposition},
  author  = {Qin, Tian and Deng, Zhiwei and Alvarez-Melis, David},
  journal = {arXiv preprint arXiv:2403.00999},
  year    = {2024},
  url     = {https://arxiv.org/abs/2403.00999}
}"""

TEMPLATES_PACKAGE = "hf_d3"
TEMPLATES_FOLDER = "model_cards"
PIPELINE_CARD_TEMPLATE = "pipeline_card.md.jinja"
DATASET_CARD_TEMPLATE = "dataset_card.md.jinja"
#: hf_d3's own benchmark figure (`benchmarks/accuracy_vs_storage.py`), shipped with the package for the cards.
CURVE_FILENAME = "accuracy_vs_storage.png"
#: Written with the figure from the same records: where a baseline reaches D3. The card shows it under the figure.
CURVE_CAPTION_FILENAME = "accuracy_vs_storage.md"
TRAIN_SNIPPET_MARKERS = ("<!-- hf_d3:train-snippet:start -->", "<!-- hf_d3:train-snippet:end -->")
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential", re.IGNORECASE)
# The datasets hf_d3 reads from local files, by the Hub id a card names them with
BUILTIN_HUB_IDS = {"builtin:fashion_mnist": "zalando-datasets/fashion_mnist"}
# Settings that are places on the machine that ran: a card shows none of them
MACHINE_PATHS = ("output_dir", "stage_dir")


def _shipped_text(name: str) -> str:
    return resources.files(TEMPLATES_PACKAGE).joinpath(TEMPLATES_FOLDER).joinpath(name).read_text("utf-8")


def _render(template_name: str, **values) -> str:
    source = _shipped_text(template_name)
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    environment.filters["thousands"] = "{:,}".format  # 1,207,637 values: counts of many classes stay readable
    return environment.from_string(source).render(**values)


def _public_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings without any secret-looking entry (tokens, passwords), recursively, nor a path of the machine
    (`MACHINE_PATHS`; a local dataset or teacher by its folder's name: `dataset_reference`)."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings must be a dict, got {type(settings).__name__}")
    settings = {k: v for k, v in settings.items() if k not in MACHINE_PATHS}
    for name in ("dataset", "teacher"):
        if isinstance(settings.get(name), str):
            settings[name] = dataset_reference(settings[name])

    def clean(value):
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, str | int | float | bool) or value is None:
            return value
        return str(value)

    return clean(settings)


def dataset_reference(name: str) -> str:
    """How a card names a dataset (or checkpoint): a Hub id as it is, a builtin by its Hub id, and a local folder by
    its name alone (a path of the machine that ran means nothing elsewhere, and may say more than meant)."""
    if name in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name]
    path = Path(name).expanduser()
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.exists():
        return path.resolve().name
    return name


def _format_bytes(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def _fraction(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(f"metrics[{key!r}] must be a fraction in [0, 1] (see hf_d3.results.CARD_METRICS), "
                         f"got {value!r}")
    return float(value)


def _non_negative(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"metrics[{key!r}] must be a non-negative number (see hf_d3.results.CARD_METRICS), "
                         f"got {value!r}")
    return float(value)


def render_pipeline_card(
    pipe: D3Pipeline,
    repo_id: str,
    *,
    metrics: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    samples_file: str | None = None,
    curve_file: str | None = None,
    source_dataset: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """The README.md of a pipeline repo: card metadata (validated with `ModelCardData` / `ModelCard`) and body.

    `metrics` keys are described in `CARD_METRICS`; `settings` are shown as YAML (secret-looking keys dropped),
    and `settings["dataset"]` names the source dataset unless `source_dataset` is given. `samples_file` and
    `curve_file` (`CURVE_FILENAME`, the benchmark's accuracy against storage) are images in the repo to show.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if metrics is not None and not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict (keys: hf_d3.results.CARD_METRICS), got {type(metrics).__name__}")
    metrics = dict(metrics or {})
    settings = _public_settings(settings)
    source_dataset = dataset_reference(source_dataset) if source_dataset else settings.get("dataset")
    accuracy, accuracy_std = _fraction(metrics, "accuracy_mean"), _fraction(metrics, "accuracy_std")
    wall_time = _non_negative(metrics, "distill_wall_time_s")
    peak_memory = _non_negative(metrics, "distill_peak_memory_bytes")
    runs = metrics.get("num_eval_runs")
    architecture = metrics.get("student_architecture")

    model_name = repo_id.split("/")[-1]
    tags = ["dataset-distillation", "d3", "hf_d3", "distilled-dataset"]
    eval_results = None
    if source_dataset:
        tags.append(str(source_dataset))
    if accuracy is not None:
        student = f"{architecture} students" if architecture else "students"
        eval_results = [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=str(source_dataset or "unknown"),
                dataset_name=str(source_dataset or "unknown"),
                dataset_split="test",
                metric_type="accuracy",
                metric_name=f"Test accuracy of {student} trained on the distilled data",
                metric_value=round(accuracy, 6),
            )
        ]
    card_data = ModelCardData(
        library_name="hf_d3",
        license=license,
        tags=tags,
        datasets=[str(source_dataset)] if source_dataset else None,
        metrics=["accuracy"],
        model_name=model_name,
        eval_results=eval_results,
    )

    if accuracy is None:
        accuracy_text = "not measured"
    else:
        accuracy_text = f"{100 * accuracy:.2f}%"
        if accuracy_std is not None:
            accuracy_text = f"{100 * accuracy:.2f} ± {100 * accuracy_std:.2f}%"
        details = [f"{architecture}" if architecture else None, f"{runs} runs" if runs else None]
        details = [d for d in details if d]
        if details:
            accuracy_text += f" ({', '.join(details)})"
    storage = pipe.storage_report()
    known = set(CARD_METRICS)
    # single figures only: a run's metrics.json also holds per-subtask loss histories, one value per iteration
    extra_metrics = [(k, v) for k, v in sorted(metrics.items())
                     if k not in known and isinstance(v, int | float | str) and not _SECRET_KEY.search(k)]
    store_config = pipe.latent_store.config
    shown = len(grid_classes(list(store_config.class_ids)))  # the rows of the sample grid (`sample_grid`)
    grid_rows = ("one row per class" if shown == len(store_config.class_ids) else
                 f"one row for each of {shown} of the {len(store_config.class_ids)} classes, evenly spaced")
    text = _render(
        PIPELINE_CARD_TEMPLATE,
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id,
        source_dataset=source_dataset or "an image classification dataset",
        latents_per_class=store_config.latents_per_class,
        num_subtasks=pipe.decoder.config.num_subtasks,
        samples_file=samples_file,
        grid_rows=grid_rows,
        curve_file=curve_file,
        curve_caption=_shipped_text(CURVE_CAPTION_FILENAME).strip() if curve_file else "",
        accuracy_text=accuracy_text,
        storage=storage,
        storage_bytes_text=_format_bytes(storage.total_bytes),
        storage_dtype=pipe.latent_store.config.storage_dtype,
        ipc_text=f"{storage.ipc_equivalent:.2f}",
        ipc_bytes_text=f"{storage.ipc_equivalent_bytes:.2f}",
        wall_time_text=f"{wall_time:.0f} s" if wall_time is not None else "not measured",
        peak_memory_text=_format_bytes(peak_memory) if peak_memory is not None else "not measured",
        extra_metrics=extra_metrics,
        settings_yaml=yaml.safe_dump(settings, sort_keys=True).strip() if settings else "",
        citation=CITATION,
    )
    card = ModelCard(text)  # parses the metadata back: a malformed block or model-index raises here
    if card.data.library_name != "hf_d3" or (accuracy is not None and not card.data.eval_results):
        raise ValueError("the rendered pipeline card lost its metadata; check model_cards/pipeline_card.md.jinja")
    return text


def _configs_of(card_data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every config of a dataset card's metadata, with its splits and sizes (from `dataset_info`)."""
    infos = card_data.get("dataset_info") or []
    if isinstance(infos, Mapping):
        infos = [infos]
    info_by_name = {info.get("config_name", "default"): info for info in infos if isinstance(info, Mapping)}
    configs = []
    for config in card_data.get("configs") or []:
        name = config.get("config_name", "default")
        splits = [
            {"name": split.get("name"), "num_examples": split.get("num_examples", "?")}
            for split in (info_by_name.get(name, {}).get("splits") or [])
        ]
        configs.append({"name": name, "splits": splits})
    return configs


def render_dataset_card(
    card_metadata: Mapping[str, Any],
    repo_id: str,
    example_config: str,
    *,
    source_dataset: str | None = None,
    license: str = "apache-2.0",
    pretty_name: str | None = None,
    pipeline_repo_id: str | None = None,
    epochs: int = 300,
) -> str:
    """The README.md of a dataset repo from its current metadata (the `configs` and `dataset_info` that
    `push_to_hub` maintains are kept), listing every config and with a training snippet for `example_config`."""
    from huggingface_hub import DatasetCard, DatasetCardData, constants

    metadata = dict(card_metadata)
    tags = list(dict.fromkeys([*(metadata.get("tags") or []), "dataset-distillation", "d3", "hf_d3", "synthetic"]))
    if source_dataset:
        source_dataset = dataset_reference(source_dataset)
        tags = list(dict.fromkeys([*tags, str(source_dataset)]))
        metadata["source_datasets"] = [str(source_dataset)]
    metadata.update(
        license=license,
        tags=tags,
        task_categories=["image-classification"],
        pretty_name=pretty_name or metadata.get("pretty_name") or repo_id.split("/")[-1],
    )
    card_data = DatasetCardData(**metadata)
    configs = _configs_of(metadata)
    if example_config not in [c["name"] for c in configs]:
        raise ValueError(
            f"config {example_config!r} is not in the dataset card's configs {[c['name'] for c in configs]}"
        )
    text = _render(
        DATASET_CARD_TEMPLATE,
        card_data=card_data.to_yaml(),
        pretty_name=card_data.pretty_name,
        repo_id=repo_id,
        source_dataset=source_dataset or metadata.get("source_datasets", ["an image classification dataset"])[0],
        configs=configs,
        example_config=example_config,
        epochs=epochs,
        pipeline_repo_id=pipeline_repo_id,
        pipeline_url=f"{constants.ENDPOINT}/{pipeline_repo_id}" if pipeline_repo_id else None,
        citation=CITATION,
    )
    card = DatasetCard(text)  # parses the metadata back
    if [c.get("config_name") for c in card.data.get("configs") or []] != [c["name"] for c in configs]:
        raise ValueError("the rendered dataset card lost its configs; check model_cards/dataset_card.md.jinja")
    return text


def extract_train_snippet(card_text: str) -> str:
    """The Python training snippet of a dataset card (between the `TRAIN_SNIPPET_MARKERS`)."""
    start, end = TRAIN_SNIPPET_MARKERS
    match = re.search(re.escape(start) + r"\s*```python\n(.*?)```\s*" + re.escape(end), card_text, flags=re.DOTALL)
    if match is None:
        raise ValueError("this card has no hf_d3 training snippet")
    return match.group(1)
