"""Publish D3 distilled datasets to the Hugging Face Hub, as a pipeline repo and as Parquet dataset repos.

Pulling needs nothing from here: `D3Pipeline.from_pretrained(repo_id, revision=...)` downloads and loads a
pipeline repo, and `datasets.load_dataset(repo_id, config_name)` loads a dataset config. A pipeline repo also
carries the code of its classes (`hf_d3.remote_code`), so `DiffusionPipeline.from_pretrained(repo_id,
trust_remote_code=True)` loads it where hf_d3 is not installed.

Everything goes through `huggingface_hub`, so `HF_ENDPOINT` (another Hub), `HF_TOKEN` and `HF_HOME` apply. The
token is sent to the Hub only: it is never logged, put in an error message or written into a card.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cards import (
    CURVE_FILENAME,
    TEMPLATES_FOLDER,
    TEMPLATES_PACKAGE,
    render_dataset_card,
    render_pipeline_card,
)
from .remote_code import add_remote_code
from .sample_grid import sample_grid
from .version import __version__

if TYPE_CHECKING:
    import datasets
    from huggingface_hub import CommitInfo

    from .pipelines.pipeline_d3 import D3Pipeline

logger = logging.getLogger(__name__)

SAMPLES_FILENAME = "samples.png"
_CONFIG_NAME = re.compile(r"[A-Za-z0-9][\w.\-]{0,63}")


class HubPublishError(RuntimeError):
    """Publishing to the Hub failed (refused, unreachable or interrupted); nothing local was changed."""


def _resolve_token(token: str | None, repo_id: str) -> str:
    from huggingface_hub import get_token

    if token is not None and not isinstance(token, str):
        raise ValueError(f"token must be a string or None, got {type(token).__name__}")
    token = token or get_token()
    if not token:
        raise ValueError(f"No Hugging Face token to publish {repo_id!r}: pass token=..., set the HF_TOKEN "
                         "environment variable or run `hf auth login`")
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

    state = state or ("The Hub applies a commit whole or not at all, so the repo keeps its previous revision unless "
                      "the commit went through")
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


class RepoTakenError(ValueError):
    """The repo holds something other than a D3 pipeline: publishing would mix files into it and replace its card."""


def check_pipeline_repo(api: Any, repo_id: str, revision: str | None = None) -> None:
    """Refuse (`RepoTakenError`) a model repo that holds files beyond a card and is not a D3 pipeline (called by
    `push_pipeline_to_hub` before it uploads anything, and by a run's preflight before it trains)."""
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    try:
        files = set(api.list_repo_files(repo_id, revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return  # a new repo or branch
    if not files - {".gitattributes", "README.md"}:
        return
    held = "no model_index.json"
    if "model_index.json" in files:
        index = json.loads(Path(api.hf_hub_download(repo_id, "model_index.json", revision=revision)).read_text())
        name = index.get("_class_name")
        if (name[-1] if isinstance(name, list) else name) == "D3Pipeline":
            return
        held = f"a {name!r} pipeline"
    raise RepoTakenError(f"the Hub repo {repo_id!r} already holds another model ({held}; files "
                         f"{sorted(files)[:6]}); valid: a new repo id, or one that holds a D3Pipeline")


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
    """Publish a D3 pipeline (components and their code, `model_index.json`, model card, sample grid) in one
    commit; `pipe.push_to_hub(repo_id, ...)` is the same call.

    The repo is created if needed and reused if it exists. Load it back with `D3Pipeline.from_pretrained(repo_id)`,
    or without hf_d3 with `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`.

    Args:
        pipe: the pipeline to publish.
        repo_id: "namespace/name" (a bare "name" goes to the token owner's namespace).
        metrics: measured results; keys in `hf_d3.results.CARD_METRICS` (fractions for accuracies).
        settings: the distillation settings, shown on the card (keys that look like secrets are dropped).
        samples_png: a PNG sample grid, uploaded as `samples.png` and shown on the card; default: one drawn from
            `pipe` (`hf_d3.sample_grid.sample_grid`).
        token: a Hub token with write access; defaults to `HF_TOKEN` / the saved login.
        private: create the repo as private (an existing repo keeps its visibility).
        revision: branch to commit to (created from `main` if missing); default `main`.
        commit_message: the commit title.
        source_dataset: the distilled dataset's name; defaults to `settings["dataset"]`.
        license: the card's license identifier.

    Returns:
        The `CommitInfo` of the commit (a str: the commit URL; `.oid` is the revision).

    Raises:
        ValueError: invalid `repo_id`, no token, a missing `samples_png`, malformed metrics; `RepoTakenError` (a
            ValueError) for a repo that holds another model, before anything is uploaded.
        HubPublishError: the Hub refused the upload or the connection failed; the repo keeps its previous
            revision unless the commit went through, and nothing local changes.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    repo_id = _check_repo_id(repo_id)
    token = _resolve_token(token, repo_id)
    samples_path = None
    if samples_png is not None:
        samples_path = Path(samples_png)
        if not samples_path.is_file():
            raise ValueError(f"samples_png={str(samples_png)!r} is not a file")
    api = HfApi(token=token, library_name="hf_d3", library_version=__version__)
    curve = resources.files(TEMPLATES_PACKAGE).joinpath(TEMPLATES_FOLDER, CURVE_FILENAME)
    card_args = dict(metrics=metrics, settings=settings, samples_file=SAMPLES_FILENAME,
                     curve_file=CURVE_FILENAME if curve.is_file() else None, source_dataset=source_dataset,
                     license=license)
    # Render (and validate) the card before any network call: bad metrics fail fast with nothing sent.
    card = render_pipeline_card(pipe, repo_id, **card_args)

    with tempfile.TemporaryDirectory(prefix="hf_d3-push-") as folder:
        pipe.save_pretrained(folder, safe_serialization=True)
        add_remote_code(folder)
        if samples_path is None:
            samples_path = Path(folder) / SAMPLES_FILENAME
            sample_grid(pipe).save(samples_path, format="PNG")
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(folder).rglob("*"))
            if path.is_file() and path.relative_to(folder).as_posix() not in ("README.md", SAMPLES_FILENAME)
        ]
        operations.append(CommitOperationAdd(path_in_repo=SAMPLES_FILENAME, path_or_fileobj=str(samples_path)))
        if curve.is_file():
            operations.append(CommitOperationAdd(path_in_repo=CURVE_FILENAME, path_or_fileobj=curve.read_bytes()))
        try:
            created_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if created_id != repo_id:  # a bare name went to the token owner's namespace: show the full id
                repo_id, card = created_id, render_pipeline_card(pipe, created_id, **card_args)
            check_pipeline_repo(api, repo_id, revision)  # before any upload: never mix D3 into another model
            card_bytes = _scrub(card, token).encode("utf-8")
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_bytes))
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
        except RepoTakenError:
            raise
        except Exception as error:
            raise _publish_error("the pipeline", repo_id, error, token) from error
    logger.info("Published the D3 pipeline %s at %s", repo_id, info.commit_url)
    return info


def push_dataset_to_hub(
    pipe_or_dataset: D3Pipeline | datasets.Dataset,
    repo_id: str,
    config_name: str = "ipc10",
    *,
    num_samples_per_component: int = 1, include_means: bool = True, seed: int = 0, split: str = "train",
    token: str | None = None, private: bool = False, revision: str | None = None, commit_message: str | None = None,
    source_dataset: str | None = None, license: str = "apache-2.0", pretty_name: str | None = None,
    pipeline_repo_id: str | None = None,
) -> CommitInfo:
    """Publish a materialised D3 dataset as Parquet under `config_name` (one config per storage budget), then
    refresh the dataset card so it lists every config of the repo.

    Pushing another config into the same repo keeps the existing ones. Two commits are made: the data (by
    `datasets.Dataset.push_to_hub`) and the card. Load it back with `datasets.load_dataset(repo_id, config_name)`.

    Args:
        pipe_or_dataset: a `D3Pipeline` (sampled with `pipe.to_dataset(num_samples_per_component, include_means,
            seed)`) or a `datasets.Dataset` with `image`, `label` and `soft_label` columns.
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
        dataset = pipe_or_dataset.to_dataset(num_samples_per_component, include_means, seed)
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
