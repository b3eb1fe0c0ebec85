"""Publishing to and pulling from the Hub, with the real huggingface_hub / datasets / diffusers clients talking HTTP
to the local Hub of `tests/hub_server.py` (the `local_hub` fixture); nothing is mocked."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
from importlib import resources

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from datasets import ClassLabel, load_dataset
from huggingface_hub import DatasetCard, HfApi, ModelCard

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore
from hf_d3.cards import CURVE_CAPTION_FILENAME, CURVE_FILENAME, extract_train_snippet, render_pipeline_card
from hf_d3.hub import HubPublishError, push_dataset_to_hub, push_pipeline_to_hub
from hf_d3.quantization import STORAGE_DTYPES
from hf_d3.results import CARD_METRICS
from hf_d3.run_folder import budget_config_name

# huggingface_hub's plain-LFS upload (the path taken with HF_HUB_DISABLE_XET=1) passes `data=<file>` to httpx2.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

CLASS_NAMES = ["zero", "one", "two"]
METRICS = {
    "accuracy_mean": 0.8731,
    "accuracy_std": 0.0042,
    "num_eval_runs": 5,
    "student_architecture": "convnet",
    "distill_wall_time_s": 812.4,
    "distill_peak_memory_bytes": 3 * 1024**3,
}
SETTINGS = {"dataset": "mnist", "latents_per_class": 2, "decoder": "small", "hub_token": "must-not-leak"}


def make_pipe(seed: int = 0, label_top_k: int | None = None) -> D3Pipeline:
    torch.manual_seed(seed)
    store = GaussianLatentStore(
        class_ids=list(range(3)), num_classes=3, latents_per_class=2, latent_dim=8, class_names=CLASS_NAMES,
        label_top_k=label_top_k,
    )
    store.set_soft_labels(torch.rand(6, 3).softmax(1))
    decoder = D3Decoder(latent_dim=8, resolution=8, out_channels=1, channels=[8, 8])
    return D3Pipeline(latent_store=store, decoder=decoder)


def draw(pipe: D3Pipeline, seed: int = 0):
    out = pipe(
        num_samples_per_component=2, include_means=True, generator=torch.Generator().manual_seed(seed), output_type="pt"
    )
    return out.images, out.labels, out.soft_labels


def assert_same_outputs(a: D3Pipeline, b: D3Pipeline) -> None:
    for x, y in zip(draw(a), draw(b), strict=True):
        assert torch.equal(x, y)


def readme(hub, repo_id: str, repo_type: str = "model", revision: str = "main") -> str:
    return hub.files(repo_id, repo_type, revision)["README.md"].decode()


@pytest.fixture
def samples_png(tmp_path):
    path = tmp_path / "samples.png"
    PIL.Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
    return path


@pytest.fixture(scope="module", params=STORAGE_DTYPES)
def published(local_hub, request):
    """A pipeline published once in each storage dtype for the read-side tests: (repo_id, pipeline, CommitInfo);
    the pipeline holds what its stored files give back. The float16 one keeps top-2 soft labels (`label_top_k`),
    so their compact form travels too."""
    pipe = make_pipe(0, label_top_k=2 if request.param == "float16" else None)
    pipe.set_storage_dtype(request.param)
    repo_id = f"{local_hub.user}/d3-published-{request.param}-{uuid.uuid4().hex[:8]}"
    info = push_pipeline_to_hub(pipe, repo_id, metrics=METRICS, settings=SETTINGS)
    return repo_id, pipe, info


# ----------------------------------------------------------------------------------------------------------
# Pipeline repos
# ----------------------------------------------------------------------------------------------------------


def test_publish_pipeline_in_one_commit_and_load_it_back(local_hub, new_repo_id, samples_png):
    pipe, repo_id = make_pipe(1), new_repo_id("d3-pipe")
    info = push_pipeline_to_hub(pipe, repo_id, metrics=METRICS, settings=SETTINGS, samples_png=samples_png)

    commits = local_hub.commit_ids(repo_id)
    assert commits[0] == info.oid and len(commits) == 2  # the repo's initial commit, then ONE publish commit
    assert info == f"{local_hub.url}/{repo_id}/commit/{info.oid}"
    files = local_hub.files(repo_id)
    assert {
        "model_index.json",
        "latent_store/config.json",
        "latent_store/diffusion_pytorch_model.safetensors",
        "decoder/config.json",
        "decoder/diffusion_pytorch_model.safetensors",
        "README.md",
        "samples.png",
    } <= set(files)
    tree = {f.path: f for f in HfApi().list_repo_tree(repo_id, recursive=True) if hasattr(f, "lfs")}
    assert tree["decoder/diffusion_pytorch_model.safetensors"].lfs is not None  # weights went through LFS
    assert tree["model_index.json"].lfs is None

    loaded = D3Pipeline.from_pretrained(repo_id)
    assert_same_outputs(pipe, loaded)
    assert loaded.latent_store.class_names == CLASS_NAMES
    assert samples_png.read_bytes() == files["samples.png"]
    curve = resources.files("hf_d3").joinpath("model_cards", CURVE_FILENAME)
    assert files[CURVE_FILENAME] == curve.read_bytes()  # the benchmark's accuracy-vs-storage figure, shipped


def test_pipeline_card(local_hub, published):
    repo_id, pipe, _ = published
    text = readme(local_hub, repo_id)
    card = ModelCard(text)
    assert card.data.library_name == "hf_d3"
    assert {"dataset-distillation", "d3", "mnist"} <= set(card.data.tags)
    assert card.data.datasets == ["mnist"] and card.data.license
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_name) == ("accuracy", 0.8731, "mnist")
    storage = pipe.storage_report()
    assert "87.31 ± 0.42%" in text
    assert f"{storage.ipc_equivalent:.2f} images per class equivalent** in values; " \
           f"{storage.ipc_equivalent_bytes:.2f} in bytes" in text
    assert f"{storage.total_values:,} values (" in text and f" in {pipe.decoder.config.storage_dtype}), **" in text
    assert "812 s wall time, 3.00 GiB peak memory" in text
    assert f'D3Pipeline.from_pretrained("{repo_id}")' in text and "pipe.to_dataset(" in text
    assert "arXiv:2403.00999" in text and "Alvarez-Melis" in text and "@article{" in text
    assert f"![Test accuracy against storage: D3, explicit prototypes and random real images]({CURVE_FILENAME})" in text
    caption = resources.files("hf_d3").joinpath("model_cards", CURVE_CAPTION_FILENAME).read_text().strip()
    assert caption and caption in text  # where a baseline reaches D3, drawn with the figure from the same records
    assert "latents_per_class: 2" in text  # settings
    assert "must-not-leak" not in text and "hub_token" not in text  # secret-looking settings are dropped
    assert local_hub.token not in text
    assert set(CARD_METRICS) == set(METRICS)  # every key the card reads is documented


def test_the_pipeline_card_lists_single_figures_only():
    metrics = {**METRICS, "teacher_accuracy": 0.71, "subtasks": [{"loss_history": {"mtt": [0.5] * 1000}}]}
    text = render_pipeline_card(make_pipe(), "user/d3", metrics=metrics)
    assert "- `teacher_accuracy`: 0.71" in text
    assert "subtasks" not in text and "loss_history" not in text and "0.5, 0.5" not in text


def test_a_published_run_names_its_dataset_config_after_the_budget():
    pipe = make_pipe()
    assert budget_config_name(pipe, {"storage_budget_ipc": 10}) == "ipc10"
    assert budget_config_name(pipe, {"storage_budget_ipc": 0.41}) == "ipc0_41"  # not "ipc0"
    assert pipe.storage_report().ipc_equivalent == pytest.approx(12.5833, abs=1e-4)  # without a budget: its storage
    assert budget_config_name(pipe, {"storage_budget_ipc": None}) == budget_config_name(pipe, None) == "ipc12_58"


def test_pull_from_cache_offline(local_hub, published, tmp_path):
    repo_id, pipe, _ = published
    D3Pipeline.from_pretrained(repo_id)  # make sure it is cached
    script = textwrap.dedent(
        """
        import sys, torch
        from huggingface_hub import constants
        from hf_d3 import D3Pipeline
        assert constants.HF_HUB_OFFLINE
        pipe = D3Pipeline.from_pretrained(sys.argv[1])
        out = pipe(num_samples_per_component=2, include_means=True, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
        torch.save([out.images, out.labels, out.soft_labels], sys.argv[2])
        """
    )
    requests_before = len(local_hub.requests)
    result_path = tmp_path / "offline.pt"
    subprocess.run(
        [sys.executable, "-c", script, repo_id, str(result_path)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        check=True,
        timeout=120,
    )
    assert len(local_hub.requests) == requests_before  # served from the cache alone
    for x, y in zip(torch.load(result_path), draw(pipe), strict=True):
        assert torch.equal(x, y)


def test_revisions(local_hub, new_repo_id):
    repo_id = new_repo_id("d3-revisions")
    first, second, branch = make_pipe(2), make_pipe(3), make_pipe(4)
    info_first = push_pipeline_to_hub(first, repo_id)
    info_second = push_pipeline_to_hub(second, repo_id, commit_message="Second distillation")
    info_branch = push_pipeline_to_hub(branch, repo_id, revision="experiment")

    assert local_hub.commit_ids(repo_id)[:2] == [info_second.oid, info_first.oid]
    assert local_hub.commit_ids(repo_id, revision="experiment")[:2] == [info_branch.oid, info_second.oid]
    assert_same_outputs(D3Pipeline.from_pretrained(repo_id), second)
    assert_same_outputs(D3Pipeline.from_pretrained(repo_id, revision=info_first.oid), first)
    assert_same_outputs(D3Pipeline.from_pretrained(repo_id, revision="experiment"), branch)


def test_existing_repo_is_reused(local_hub, new_repo_id):
    repo_id = new_repo_id("d3-existing")
    HfApi().create_repo(repo_id)
    before = local_hub.commit_ids(repo_id)
    info = push_pipeline_to_hub(make_pipe(5), repo_id)
    assert local_hub.commit_ids(repo_id) == [info.oid, *before]


def test_bare_repo_name_goes_to_the_token_owner(local_hub):
    info = push_pipeline_to_hub(make_pipe(6), "d3-bare-name")
    assert local_hub.commit_ids(f"{local_hub.user}/d3-bare-name")[0] == info.oid
    assert f'from_pretrained("{local_hub.user}/d3-bare-name")' in readme(local_hub, f"{local_hub.user}/d3-bare-name")


# ----------------------------------------------------------------------------------------------------------
# Dataset repos
# ----------------------------------------------------------------------------------------------------------


def assert_same_rows(loaded, expected) -> None:
    assert len(loaded) == len(expected)
    assert loaded["label"] == expected["label"]
    assert loaded["soft_label"] == expected["soft_label"]
    for got, want in zip(loaded["image"], expected["image"], strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_dataset_configs_round_trip(local_hub, new_repo_id):
    pipe, repo_id = make_pipe(7), new_repo_id("d3-data")
    push_dataset_to_hub(pipe, repo_id, "ipc10", source_dataset="mnist", pipeline_repo_id=f"{local_hub.user}/d3-x")
    ipc10_commit = local_hub.commit_ids(repo_id, "dataset")[0]
    push_dataset_to_hub(pipe, repo_id, "ipc50", num_samples_per_component=5, source_dataset="mnist")

    expected = pipe.to_dataset()
    loaded = load_dataset(repo_id, "ipc10", split="train")
    assert loaded.features["label"] == ClassLabel(names=CLASS_NAMES)
    assert_same_rows(loaded, expected)
    assert_same_rows(loaded, pipe.to_dataset())
    assert len(load_dataset(repo_id, "ipc50", split="train")) == 6 + 6 * 5
    assert_same_rows(load_dataset(repo_id, "ipc10", split="train", revision=ipc10_commit), expected)

    text = readme(local_hub, repo_id, "dataset")
    card = DatasetCard(text)
    assert [c["config_name"] for c in card.data.configs] == ["ipc10", "ipc50"]
    assert "| `ipc10` | train | 12 |" in text and "| `ipc50` | train | 36 |" in text
    assert {"dataset-distillation", "d3", "mnist"} <= set(card.data.tags)
    assert local_hub.token not in text


def test_dataset_card_snippet_trains_a_model(local_hub, new_repo_id):
    repo_id = new_repo_id("d3-snippet")
    push_dataset_to_hub(make_pipe(8), repo_id, "ipc1")
    snippet = extract_train_snippet(readme(local_hub, repo_id, "dataset"))
    assert f'load_dataset("{repo_id}", "ipc1", split="train")' in snippet
    assert "hf_d3" not in snippet  # no package index serves it: the card's reader has torch, transformers, datasets
    namespace: dict = {}
    exec(compile(snippet, "dataset-card-snippet", "exec"), namespace)
    assert namespace["model"].config.num_labels == 3
    assert np.isfinite(namespace["loss"].item())


def test_push_a_dataset_object(local_hub, new_repo_id):
    dataset, repo_id = make_pipe(9).to_dataset(seed=3), new_repo_id("d3-object")
    push_dataset_to_hub(dataset, repo_id, "ipc2", revision="draft")
    assert_same_rows(load_dataset(repo_id, "ipc2", split="train", revision="draft"), dataset)
    assert local_hub.commit_ids(repo_id, "dataset", "main") == local_hub.commit_ids(repo_id, "dataset")[-1:]
    with pytest.raises(ValueError, match="soft_label"):
        push_dataset_to_hub(dataset.remove_columns("soft_label"), repo_id, "ipc3")


# ----------------------------------------------------------------------------------------------------------
# Bad input and failures
# ----------------------------------------------------------------------------------------------------------


def test_no_token(local_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    requests_before = len(local_hub.requests)
    with pytest.raises(ValueError, match="No Hugging Face token.*HF_TOKEN"):
        push_pipeline_to_hub(make_pipe(), f"{local_hub.user}/d3-no-token")
    with pytest.raises(ValueError, match="No Hugging Face token"):
        push_dataset_to_hub(make_pipe(), f"{local_hub.user}/d3-no-token", "ipc10")
    assert len(local_hub.requests) == requests_before  # refused before any network call


@pytest.mark.parametrize("repo_id", ["not/a/valid/id", "bad name", "", "-dash/start"])
def test_invalid_repo_id(repo_id):
    with pytest.raises(ValueError, match="Invalid repo_id") as error:
        push_pipeline_to_hub(make_pipe(), repo_id)
    assert repr(repo_id) in str(error.value)
    with pytest.raises(ValueError, match="Invalid repo_id"):
        push_dataset_to_hub(make_pipe(), repo_id)


def test_invalid_arguments(local_hub, tmp_path):
    repo_id = f"{local_hub.user}/d3-invalid-args"
    with pytest.raises(ValueError, match="samples_png"):
        push_pipeline_to_hub(make_pipe(), repo_id, samples_png=tmp_path / "missing.png")
    with pytest.raises(ValueError, match="accuracy_mean.*fraction"):
        push_pipeline_to_hub(make_pipe(), repo_id, metrics={"accuracy_mean": 87.3})
    with pytest.raises(ValueError, match="config_name"):
        push_dataset_to_hub(make_pipe(), repo_id, "data")


def test_wrong_token_is_refused(local_hub, new_repo_id):
    with pytest.raises(HubPublishError, match="401") as error:
        push_pipeline_to_hub(make_pipe(), new_repo_id("d3-wrong-token"), token="hf_wrong_token_123")
    assert "hf_wrong_token_123" not in str(error.value)


def _failure_setup(local_hub, repo_id):
    """A repo with one publish, and the server state to compare with after a failed publish."""
    push_pipeline_to_hub(make_pipe(10), repo_id)
    return local_hub.commit_ids(repo_id), local_hub.files(repo_id)


@pytest.mark.parametrize(
    ("method", "path", "status", "disconnect"),
    [
        ("POST", r"/commit/", 500, False),  # the server refuses the commit
        ("POST", r"/commit/", None, True),  # the server dies while the commit is being sent
        ("PUT", r"^/lfs/upload/", 403, False),  # LFS storage refuses the weights
        ("POST", r"/preupload/", 400, False),  # the server refuses the upload before it starts
    ],
    ids=["commit-500", "commit-dies", "lfs-refused", "preupload-400"],
)
def test_failed_publish_leaves_no_half_commit(local_hub, new_repo_id, samples_png, method, path, status, disconnect):
    repo_id = new_repo_id("d3-failure")
    commits, files = _failure_setup(local_hub, repo_id)
    pipe, png_bytes = make_pipe(11), samples_png.read_bytes()
    expected = draw(pipe)
    with local_hub.fault(method, path, status=status or 500, disconnect=disconnect, times=None) as fault:
        with pytest.raises(HubPublishError, match=f"Publishing the pipeline to '{repo_id}'.*failed") as error:
            push_pipeline_to_hub(pipe, repo_id, metrics=METRICS, samples_png=samples_png)
    assert fault.hits >= 1
    message = str(error.value)
    assert "previous revision" in message and local_hub.token not in message
    assert ("Server disconnected" if disconnect else str(status)) in message  # says why
    assert local_hub.commit_ids(repo_id) == commits and local_hub.files(repo_id) == files  # nothing half-written
    assert samples_png.read_bytes() == png_bytes  # nothing lost locally
    for x, y in zip(draw(pipe), expected, strict=True):
        assert torch.equal(x, y)
    info = push_pipeline_to_hub(pipe, repo_id, metrics=METRICS, samples_png=samples_png)  # a retry goes through
    assert local_hub.commit_ids(repo_id) == [info.oid, *commits]
    assert_same_outputs(D3Pipeline.from_pretrained(repo_id), pipe)


def test_a_dropped_lfs_upload_is_retried(local_hub, new_repo_id):
    repo_id, pipe = new_repo_id("d3-flaky"), make_pipe(12)
    with local_hub.fault("PUT", r"^/lfs/upload/", disconnect=True, times=1) as fault:
        info = push_pipeline_to_hub(pipe, repo_id)
    assert fault.hits == 1
    assert local_hub.commit_ids(repo_id)[0] == info.oid
    assert_same_outputs(D3Pipeline.from_pretrained(repo_id), pipe)


def test_hub_down(local_hub, new_repo_id):
    repo_id = new_repo_id("d3-down")
    local_hub.stop()
    try:
        with pytest.raises(HubPublishError, match="ConnectError"):
            push_pipeline_to_hub(make_pipe(), repo_id)
    finally:
        local_hub.start()
    push_pipeline_to_hub(make_pipe(), repo_id)


def test_failed_dataset_publish_keeps_the_existing_configs(local_hub, new_repo_id):
    pipe, repo_id = make_pipe(13), new_repo_id("d3-data-failure")
    push_dataset_to_hub(pipe, repo_id, "ipc10")
    commits = local_hub.commit_ids(repo_id, "dataset")
    with local_hub.fault("POST", r"/commit/", status=500, times=None):
        with pytest.raises(HubPublishError, match="config 'ipc50' of the dataset"):
            push_dataset_to_hub(pipe, repo_id, "ipc50", num_samples_per_component=3)
    assert local_hub.commit_ids(repo_id, "dataset") == commits
    assert_same_rows(load_dataset(repo_id, "ipc10", split="train"), pipe.to_dataset())


# ----------------------------------------------------------------------------------------------------------
# The local Hub itself
# ----------------------------------------------------------------------------------------------------------


def _raw_post(local_hub, path: str, body: bytes, content_type: str, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{local_hub.url}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_local_hub_commits_are_atomic_and_need_the_token(local_hub, new_repo_id):
    repo_id = new_repo_id("raw")
    HfApi().create_repo(repo_id)
    head = local_hub.commit_ids(repo_id)
    lines = [
        {"key": "header", "value": {"summary": "half valid"}},
        {"key": "file", "value": {"path": "ok.txt", "content": "aGVsbG8=", "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 3}},
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    path = f"/api/models/{repo_id}/commit/main"
    assert _raw_post(local_hub, path, body, "application/x-ndjson", None)[0] == 401
    assert _raw_post(local_hub, path, body, "application/x-ndjson", "hf_wrong")[0] == 401
    status, answer = _raw_post(local_hub, path, body, "application/x-ndjson", local_hub.token)
    assert status == 422 and "never uploaded" in answer["error"]
    assert local_hub.commit_ids(repo_id) == head and "ok.txt" not in local_hub.files(repo_id)
    with pytest.raises(Exception, match="409|already created"):
        HfApi().create_repo(repo_id)
    status, answer = _raw_post(
        local_hub,
        "/api/validate-yaml",
        json.dumps({"content": "---\nlicense: [1\n---\n"}).encode(),
        "application/json",
        None,
    )
    assert status == 400 and answer["errors"]
    saved = yaml.safe_load((local_hub.root / "repos" / "model" / f"{repo_id}.json").read_text())
    assert saved["refs"]["main"] == head[0]


def test_publish_recipe_publishes_a_finished_run(local_hub, new_repo_id, tmp_path):
    pipe = make_pipe()
    run_dir = tmp_path / "run"
    pipe.save_pretrained(run_dir / "pipeline")
    metrics = {"accuracy_mean": 0.61, "accuracy_std": 0.02, "num_eval_runs": 3, "student_architecture": "convnet",
               "distill_wall_time_s": 12.0, "distill_peak_memory_bytes": 2**30}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "my_images").mkdir()  # a local dataset: the cards name it, never its path on this machine
    settings = {"dataset": str(tmp_path / "my_images"), "output_dir": str(run_dir), "stage_dir": str(tmp_path),
                "iterations": 5, "storage_budget_ipc": 13}
    (run_dir / "config.json").write_text(json.dumps(settings))
    model_id, dataset_id = new_repo_id("run"), new_repo_id("run-data")
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "publish.py")
    command = [sys.executable, recipe, str(run_dir), "--hub_model_id", model_id, "--hub_dataset_id", dataset_id]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert local_hub.token not in done.stdout + done.stderr

    pulled = D3Pipeline.from_pretrained(model_id)
    assert torch.equal(draw(pulled)[0], draw(pipe)[0])
    model_card = ModelCard.load(model_id).content
    assert "61.00 ± 2.00%" in model_card
    data = load_dataset(dataset_id, "ipc13", split="train")  # under the run's budget
    assert len(data) == 2 * pipe.latent_store.num_components
    card = DatasetCard.load(dataset_id, repo_type="dataset").content
    assert "D3 distilled dataset of **my_images**" in card
    assert "my_images" in model_card and str(tmp_path) not in model_card + card
    assert f'D3Pipeline.from_pretrained("{model_id}")' in card


def test_cards_name_a_dataset_by_its_hub_id_or_its_folders_name(tmp_path):
    from hf_d3.cards import dataset_reference

    (tmp_path / "folder").mkdir()
    assert dataset_reference("builtin:fashion_mnist") == "zalando-datasets/fashion_mnist"
    assert dataset_reference("zh-plus/tiny-imagenet") == "zh-plus/tiny-imagenet"
    assert dataset_reference(str(tmp_path / "folder")) == dataset_reference("../data/folder") == "folder"


def test_publish_refuses_an_unfinished_run(tmp_path):
    from hf_d3.run_folder import publish_run

    with pytest.raises(ValueError, match="metrics.json is missing"):
        publish_run(tmp_path, "user/never")


# ----------------------------------------------------------------------------------------------------------
# The diffusers way: push_to_hub on the pipeline, DiffusionPipeline loading, remote code
# ----------------------------------------------------------------------------------------------------------


def test_pipe_push_to_hub_is_the_d3_publish(local_hub, new_repo_id):
    pipe, repo_id = make_pipe(11), new_repo_id("d3-push")
    info = pipe.push_to_hub(repo_id, metrics=METRICS, settings=SETTINGS)
    assert local_hub.commit_ids(repo_id)[0] == info.oid and len(local_hub.commit_ids(repo_id)) == 2  # one commit
    files = local_hub.files(repo_id)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "hf_d3" and "Model Card for Model ID" not in card.content
    assert "87.31 ± 0.42%" in card.content
    assert "![Samples drawn from the distilled dataset](samples.png)" in card.content
    grid = PIL.Image.open(io.BytesIO(files["samples.png"]))  # drawn from the pipeline when none is given
    assert grid.width >= 8 * 60 and grid.height >= 3 * 60  # 8 images a row, one row per class, readable
    assert {"pipeline_d3.py", "latent_store/latent_store.py", "decoder/decoder.py"} <= set(files)
    assert_same_outputs(pipe, D3Pipeline.from_pretrained(repo_id))


def test_diffusion_pipeline_loads_a_published_repo_as_hf_d3_s_class(local_hub, published):
    from diffusers import DiffusionPipeline

    repo_id, pipe, _ = published
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # diffusers' rule for a repo that carries code
        DiffusionPipeline.from_pretrained(repo_id)
    loaded = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)
    assert type(loaded) is D3Pipeline and type(loaded.latent_store) is GaussianLatentStore
    assert_same_outputs(pipe, loaded)


def test_a_published_repo_loads_and_samples_without_hf_d3(local_hub, published, tmp_path):
    repo_id, pipe, _ = published
    script = textwrap.dedent(
        """
        import importlib.abc, importlib.util, sys

        class NoHfD3(importlib.abc.MetaPathFinder):  # as if hf_d3 and datasets were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("hf_d3", "datasets"):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoHfD3())
        try:
            importlib.import_module("hf_d3")
            raise SystemExit("hf_d3 is importable")
        except ModuleNotFoundError:
            pass
        import torch
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
        out = pipe(num_samples_per_component=2, include_means=True, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
        report = pipe.storage_report()
        print(type(pipe).__module__, type(pipe).__name__, report.total_values)
        assert not any(name.split(".")[0] == "hf_d3" for name in sys.modules)
        torch.save([out.images, out.labels, out.soft_labels], sys.argv[2])
        """
    )
    result_path = tmp_path / "remote.pt"
    done = subprocess.run([sys.executable, "-c", script, repo_id, str(result_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module, name, values = done.stdout.split()
    assert module.startswith("diffusers_modules.") and name == "D3Pipeline"  # the repo's code, not hf_d3's
    assert int(values) == pipe.storage_report().total_values
    assert "Expected types" not in done.stderr
    # diffusers reads every import of the file, `to_dataset`'s deferred `import datasets` too: only that is missing
    assert all(line.endswith("not found in your environment: datasets. Run `pip install datasets`")
               for line in done.stderr.splitlines() if "might require" in line), done.stderr[-2000:]
    for x, y in zip(torch.load(result_path), draw(pipe), strict=True):
        assert torch.equal(x, y)
