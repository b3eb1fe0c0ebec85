"""Publish D3 distilled datasets to the Hugging Face Hub, as a pipeline repo and as Parquet dataset repos.

Pulling needs nothing from here: `D3Pipeline.from_pretrained(repo_id, revision=...)` downloads and loads a
pipeline repo, and `datasets.load_dataset(repo_id, config_name)` loads a dataset config.

Everything goes through `huggingface_hub`, so `HF_ENDPOINT` (another Hub), `HF_TOKEN` and `HF_HOME` apply. The
token is sent to the Hub only: it is never logged, put in an error message or written into a card.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import torch
import yaml

if TYPE_CHECKING:
    import datasets
    from huggingface_hub import CommitInfo

    from .pipelines.pipeline_d3 import D3Pipeline

logger = logging.getLogger(__name__)

#: Keys of the `metrics` dict that `push_pipeline_to_hub` reads (all optional: a missing one shows as "not
#: measured"); any other key is listed on the card under "Other measurements".
METRIC_KEYS: dict[str, str] = {
    "accuracy_mean": "mean test accuracy of students trained on the distilled data, a fraction in [0, 1]",
    "accuracy_std": "standard deviation of that accuracy over the evaluation runs, a fraction in [0, 1]",
    "num_eval_runs": "number of students trained (runs) behind the mean and standard deviation",
    "student_architecture": 'architecture of the evaluated students, e.g. "convnet" or "resnet18_ap"',
    "distill_wall_time_s": "wall-clock time of the distillation, in seconds",
    "distill_peak_memory_bytes": "peak memory of the distillation (accelerator memory if one was used), in bytes",
}

#: Keys of the `settings` dict with a meaning on the cards; every setting is shown on the pipeline card.
SETTING_KEYS: dict[str, str] = {
    "dataset": 'the source dataset, e.g. "mnist" or "cifar10" (tagged and linked in the card metadata)',
}

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
SAMPLES_FILENAME = "samples.png"
TRAIN_SNIPPET_MARKERS = ("<!-- hf_d3:train-snippet:start -->", "<!-- hf_d3:train-snippet:end -->")
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|credential", re.IGNORECASE)
_CONFIG_NAME = re.compile(r"[A-Za-z0-9][\w.\-]{0,63}")


class HubPublishError(RuntimeError):
    """Publishing to the Hub failed (refused, unreachable or interrupted); nothing local was changed."""


# ----------------------------------------------------------------------------------------------------------
# Materialising a pipeline as a datasets.Dataset
# ----------------------------------------------------------------------------------------------------------


def dataset_features(class_names: list[str]) -> datasets.Features:
    """The columns of a materialised D3 dataset: `image`, `label` (ClassLabel) and `soft_label` (float32 list)."""
    import datasets

    float_list = getattr(datasets, "List", None) or datasets.Sequence  # `List` is datasets >= 4
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(class_names)),
            "soft_label": float_list(datasets.Value("float32")),
        }
    )


def pipeline_to_dataset(
    pipe: D3Pipeline, num_samples_per_component: int = 1, include_means: bool = True, seed: int = 0
) -> datasets.Dataset:
    """Draw the training set of a D3 pipeline as a `datasets.Dataset`.

    Args:
        pipe: the pipeline to sample.
        num_samples_per_component: fresh samples drawn from every Gaussian component.
        include_means: also include every component's mean image (first).
        seed: seed of the `torch.Generator` the samples are drawn with; the same seed gives the same dataset.

    Returns:
        A dataset with columns `image` (PIL images), `label` (a `ClassLabel` named by the latent store's
        `class_names`) and `soft_label` (the component's soft label, float32).
    """
    import datasets

    if num_samples_per_component < 0 or (num_samples_per_component == 0 and not include_means):
        raise ValueError(
            f"num_samples_per_component={num_samples_per_component} with include_means={include_means} "
            "draws no image; use num_samples_per_component >= 1 or include_means=True"
        )
    generator = torch.Generator().manual_seed(seed)
    output = pipe(
        num_samples_per_component=num_samples_per_component,
        include_means=include_means,
        generator=generator,
        output_type="pil",
    )
    return datasets.Dataset.from_dict(
        {
            "image": list(output.images),
            "label": output.labels.cpu().tolist(),
            "soft_label": output.soft_labels.float().cpu().tolist(),
        },
        features=dataset_features(pipe.latent_store.class_names),
    )


# ----------------------------------------------------------------------------------------------------------
# Checks shared by the publishers
# ----------------------------------------------------------------------------------------------------------


def _resolve_token(token: str | None, repo_id: str) -> str:
    from huggingface_hub import get_token

    if token is not None and not isinstance(token, str):
        raise ValueError(f"token must be a string or None, got {type(token).__name__}")
    token = token or get_token()
    if not token:
        raise ValueError(
            f"No Hugging Face token to publish {repo_id!r}: pass token=..., set the HF_TOKEN environment variable "
            "or run `hf auth login`"
        )
    return token


def _check_repo_id(repo_id: Any) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise ValueError(f"repo_id must be a string like 'user/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid repo_id {repo_id!r}: {error}") from None
    return repo_id


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def _publish_error(what: str, repo_id: str, error: BaseException, token: str, state: str | None = None):
    from huggingface_hub import constants

    state = state or (
        "The Hub applies a commit whole or not at all, so the repo keeps its previous revision unless the commit "
        "went through"
    )
    message = (
        f"Publishing {what} to {repo_id!r} on {constants.ENDPOINT} failed: {_describe(error)}\n"
        f"{state}; nothing local was changed or deleted. Fix the cause and publish again (files already uploaded "
        "are not sent twice)."
    )
    return HubPublishError(_scrub(message, token))


def _describe(error: BaseException) -> str:
    """The error and its causes (the cause of an LFS upload failure is the HTTP error that says why)."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        # httpx's status errors repeat what huggingface_hub's HfHubHTTPError around them already says
        if not (parts and type(error).__module__.startswith("httpx") and type(error).__name__ == "HTTPStatusError"):
            parts.append(f"{type(error).__name__}: {str(error).strip()}")
        error = error.__cause__
    return "\ncaused by ".join(parts)


def _render(template_name: str, **values) -> str:
    source = resources.files(TEMPLATES_PACKAGE).joinpath(TEMPLATES_FOLDER).joinpath(template_name).read_text("utf-8")
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True
    )
    return environment.from_string(source).render(**values)


def _public_settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings without any secret-looking entry (tokens, passwords), recursively."""
    if settings is None:
        return {}
    if not isinstance(settings, Mapping):
        raise ValueError(f"settings must be a dict, got {type(settings).__name__}")

    def clean(value):
        if isinstance(value, Mapping):
            return {str(k): clean(v) for k, v in value.items() if not _SECRET_KEY.search(str(k))}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, str | int | float | bool) or value is None:
            return value
        return str(value)

    return clean(settings)


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
        raise ValueError(f"metrics[{key!r}] must be a fraction in [0, 1] (see hf_d3.hub.METRIC_KEYS), got {value!r}")
    return float(value)


def _non_negative(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"metrics[{key!r}] must be a non-negative number (see hf_d3.hub.METRIC_KEYS), got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------------
# Pipeline repo
# ----------------------------------------------------------------------------------------------------------


def render_pipeline_card(
    pipe: D3Pipeline,
    repo_id: str,
    *,
    metrics: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    samples_file: str | None = None,
    source_dataset: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """The README.md of a pipeline repo: card metadata (validated with `ModelCardData` / `ModelCard`) and body.

    `metrics` keys are described in `METRIC_KEYS`; `settings` are shown as YAML (secret-looking keys dropped),
    and `settings["dataset"]` names the source dataset unless `source_dataset` is given.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if metrics is not None and not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict (keys: hf_d3.hub.METRIC_KEYS), got {type(metrics).__name__}")
    metrics = dict(metrics or {})
    settings = _public_settings(settings)
    source_dataset = source_dataset or settings.get("dataset")
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
    known = set(METRIC_KEYS)
    extra_metrics = [(k, v) for k, v in sorted(metrics.items()) if k not in known and not _SECRET_KEY.search(k)]
    store_config = pipe.latent_store.config
    text = _render(
        PIPELINE_CARD_TEMPLATE,
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id,
        source_dataset=source_dataset or "an image classification dataset",
        latents_per_class=store_config.latents_per_class,
        num_subtasks=pipe.decoder.config.num_subtasks,
        samples_file=samples_file,
        accuracy_text=accuracy_text,
        storage=storage,
        storage_bytes_text=_format_bytes(storage.total_bytes),
        ipc_text=f"{storage.ipc_equivalent:.2f}",
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


def push_pipeline_to_hub(
    pipe: D3Pipeline,
    repo_id: str,
    *,
    metrics: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    samples_png: str | os.PathLike | None = None,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload D3 distilled dataset pipeline",
    source_dataset: str | None = None,
    license: str = "apache-2.0",
) -> CommitInfo:
    """Publish a D3 pipeline (components, `model_index.json`, model card, sample grid) in one commit.

    The repo is created if needed and reused if it exists. Load it back with `D3Pipeline.from_pretrained(repo_id)`.

    Args:
        pipe: the pipeline to publish.
        repo_id: "namespace/name" (a bare "name" goes to the token owner's namespace).
        metrics: measured results; keys in `METRIC_KEYS` (fractions for accuracies).
        settings: the distillation settings, shown on the card (keys that look like secrets are dropped).
        samples_png: a PNG sample grid, uploaded as `samples.png` and shown on the card.
        token: a Hub token with write access; defaults to `HF_TOKEN` / the saved login.
        private: create the repo as private (an existing repo keeps its visibility).
        revision: branch to commit to (created from `main` if missing); default `main`.
        commit_message: the commit title.
        source_dataset: the distilled dataset's name; defaults to `settings["dataset"]`.
        license: the card's license identifier.

    Returns:
        The `CommitInfo` of the commit (a str: the commit URL; `.oid` is the revision).

    Raises:
        ValueError: invalid `repo_id`, no token, a missing `samples_png`, malformed metrics.
        HubPublishError: the Hub refused the upload or the connection failed; the repo keeps its previous
            revision unless the commit went through, and nothing local changes.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from . import __version__

    repo_id = _check_repo_id(repo_id)
    token = _resolve_token(token, repo_id)
    samples_path = None
    if samples_png is not None:
        samples_path = Path(samples_png)
        if not samples_path.is_file():
            raise ValueError(f"samples_png={str(samples_png)!r} is not a file")
    api = HfApi(token=token, library_name="hf_d3", library_version=__version__)
    card_args = dict(
        metrics=metrics,
        settings=settings,
        samples_file=SAMPLES_FILENAME if samples_path else None,
        source_dataset=source_dataset,
        license=license,
    )
    # Render (and validate) the card before any network call: bad metrics fail fast with nothing sent.
    card = render_pipeline_card(pipe, repo_id, **card_args)

    with tempfile.TemporaryDirectory(prefix="hf_d3-push-") as folder:
        pipe.save_pretrained(folder, safe_serialization=True)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() != "README.md"
        ]
        if samples_path is not None:
            operations.append(CommitOperationAdd(path_in_repo=SAMPLES_FILENAME, path_or_fileobj=str(samples_path)))
        try:
            created_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if created_id != repo_id:  # a bare name went to the token owner's namespace: show the full id
                repo_id, card = created_id, render_pipeline_card(pipe, created_id, **card_args)
            card_bytes = _scrub(card, token).encode("utf-8")
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_bytes))
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
        except Exception as error:
            raise _publish_error("the pipeline", repo_id, error, token) from error
    logger.info("Published the D3 pipeline %s at %s", repo_id, info.commit_url)
    return info


# ----------------------------------------------------------------------------------------------------------
# Dataset repo
# ----------------------------------------------------------------------------------------------------------


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


def push_dataset_to_hub(
    pipe_or_dataset: D3Pipeline | datasets.Dataset,
    repo_id: str,
    config_name: str = "ipc10",
    *,
    num_samples_per_component: int = 1,
    include_means: bool = True,
    seed: int = 0,
    split: str = "train",
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    source_dataset: str | None = None,
    license: str = "apache-2.0",
    pretty_name: str | None = None,
    pipeline_repo_id: str | None = None,
) -> CommitInfo:
    """Publish a materialised D3 dataset as Parquet under `config_name` (one config per storage budget), then
    refresh the dataset card so it lists every config of the repo.

    Pushing another config into the same repo keeps the existing ones. Two commits are made: the data (by
    `datasets.Dataset.push_to_hub`) and the card. Load it back with `datasets.load_dataset(repo_id, config_name)`.

    Args:
        pipe_or_dataset: a `D3Pipeline` (sampled with `pipeline_to_dataset(pipe, num_samples_per_component,
            include_means, seed)`) or a `datasets.Dataset` with `image`, `label` and `soft_label` columns.
        repo_id: "namespace/name" of the dataset repo (a bare "name" goes to the token owner's namespace).
        config_name: the config to write, e.g. "ipc10"; a config of that name is replaced.
        split: the split name.
        token, private, revision: as in `push_pipeline_to_hub`.
        commit_message: title of the data commit.
        source_dataset: the distilled dataset's name, for the card.
        license, pretty_name: card metadata.
        pipeline_repo_id: the pipeline repo the data was sampled from, linked from the card.

    Returns:
        The `CommitInfo` of the card commit (the repo's new head).

    Raises:
        ValueError: invalid `repo_id` or `config_name`, no token, a dataset without the D3 columns.
        HubPublishError: the Hub refused the upload or the connection failed.
    """
    import datasets
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi

    from . import __version__

    repo_id = _check_repo_id(repo_id)
    if not isinstance(config_name, str) or not _CONFIG_NAME.fullmatch(config_name) or config_name == "data":
        raise ValueError(
            f"Invalid config_name {config_name!r}: use letters, digits, '_', '-' or '.', not 'data' (e.g. 'ipc10')"
        )
    token = _resolve_token(token, repo_id)
    if isinstance(pipe_or_dataset, datasets.Dataset):
        dataset = pipe_or_dataset
        missing = {"image", "label", "soft_label"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"the dataset lacks the D3 columns {sorted(missing)}; it has {dataset.column_names}")
    else:
        dataset = pipeline_to_dataset(pipe_or_dataset, num_samples_per_component, include_means, seed)
    api = HfApi(token=token, library_name="hf_d3", library_version=__version__)

    try:
        repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
        data_commit = dataset.push_to_hub(
            repo_id,
            config_name=config_name,
            split=split,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message or f"Upload D3 distilled data: config {config_name}",
        )
        readme = api.hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=data_commit.oid)
        metadata = DatasetCard.load(readme).data.to_dict()
    except Exception as error:
        raise _publish_error(f"config {config_name!r} of the dataset", repo_id, error, token) from error

    card = render_dataset_card(
        metadata,
        repo_id,
        config_name,
        source_dataset=source_dataset,
        license=license,
        pretty_name=pretty_name,
        pipeline_repo_id=pipeline_repo_id,
    )
    card = _scrub(card, token)
    try:
        info = api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8"))],
            commit_message=f"Update the dataset card for config {config_name}",
            repo_type="dataset",
            revision=revision,
            parent_commit=data_commit.oid,
        )
    except Exception as error:
        state = (
            f"The data of config {config_name!r} is published (commit {data_commit.oid}) and loads with "
            "load_dataset, but the card was not updated"
        )
        raise _publish_error("the dataset card", repo_id, error, token, state) from error
    logger.info("Published config %s of the D3 dataset %s at %s", config_name, repo_id, info.commit_url)
    return info


def publish_run(
    run_dir: str | os.PathLike,
    hub_model_id: str,
    hub_dataset_id: str | None = None,
    *,
    token: str | None = None,
    private: bool = False,
) -> dict[str, CommitInfo]:
    """Publish a finished run folder (`pipeline/`, `metrics.json`, `config.json`, `samples.png`): the pipeline
    to `hub_model_id` and, if given, its materialised dataset to `hub_dataset_id` under config `ipc<N>`."""
    import json

    from .pipelines.pipeline_d3 import D3Pipeline

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise ValueError(f"{run_dir} is not a finished run: metrics.json is missing (did the run fail?)")
    pipe = D3Pipeline.from_pretrained(run_dir / "pipeline")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    settings = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else None
    samples = run_dir / "samples.png"
    commits = {"pipeline": push_pipeline_to_hub(
        pipe, hub_model_id, metrics=metrics, settings=settings, token=token, private=private,
        samples_png=samples if samples.is_file() else None,
    )}
    if hub_dataset_id:
        budget = f"ipc{round(pipe.storage_report().ipc_equivalent)}"
        commits["dataset"] = push_dataset_to_hub(pipe, hub_dataset_id, config_name=budget, token=token,
                                                 private=private, pipeline_repo_id=hub_model_id)
    return commits
