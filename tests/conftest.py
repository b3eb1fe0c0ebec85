"""Shared test setup.

Section 1 must stay at the very top: huggingface_hub, datasets and diffusers read their Hub settings when they are
imported, so the environment has to point them at the local test Hub before anything imports them.
"""

# ======================================================================================================
# 1. Hub environment (before any import of huggingface_hub / datasets / diffusers / hf_d3)
# ======================================================================================================
import atexit
import os
import shutil
import tempfile
from pathlib import Path

from hub_server import free_port  # noqa: E402  (stdlib-only module)

HUB_HOST = "127.0.0.1"
HUB_PORT = free_port(HUB_HOST)
HUB_TOKEN = "hf_local_test_token_d3"  # only valid on the local test Hub
HUB_USER = "d3-tester"
_HF_HOME = tempfile.mkdtemp(prefix="hf_d3-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

os.environ.update(
    {
        "HF_ENDPOINT": f"http://{HUB_HOST}:{HUB_PORT}",
        "HF_HOME": _HF_HOME,
        "HF_TOKEN": HUB_TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "DO_NOT_TRACK": "1",
    }
)
# Nothing can reach the real Hub: every Hub call goes to the local server, so offline mode is not needed to fail
# fast, and the Hub tests need online mode (tests that want offline mode set it in a subprocess).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH", "HF_HUB_CACHE"):
    os.environ.pop(_name, None)

import uuid  # noqa: E402

import pytest  # noqa: E402
from hub_server import LocalHub, wait_until_up  # noqa: E402


# ======================================================================================================
# 2. Hub fixtures
# ======================================================================================================
@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """A Hub-compatible server on `HF_ENDPOINT`, for the whole session.

    Yields a `hub_server.LocalHub`: `.url`, `.token`, `.user`, `.root` (its storage folder), inspection helpers
    (`.commit_ids(repo_id, repo_type)`, `.files(...)`, `.requests`) and `.fault(method, path_regex, status=...,
    disconnect=..., times=...)`, a context manager that makes matching requests fail with an HTTP status or drop the
    connection halfway through the upload.
    """
    import huggingface_hub.constants

    if huggingface_hub.constants.ENDPOINT != os.environ["HF_ENDPOINT"]:
        pytest.fail(
            "huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT "
            f"(it uses {huggingface_hub.constants.ENDPOINT}); a plugin or sitecustomize imports it too early"
        )
    hub = LocalHub(tmp_path_factory.mktemp("local_hub"), token=HUB_TOKEN, port=HUB_PORT, host=HUB_HOST, user=HUB_USER)
    with hub:
        wait_until_up(hub.url)
        yield hub


@pytest.fixture
def new_repo_id(local_hub):
    """A factory of repo ids no test has used yet: `new_repo_id("d3-mnist")` -> "d3-tester/d3-mnist-1a2b3c4d"."""

    def make(stem: str = "repo") -> str:
        return f"{local_hub.user}/{stem}-{uuid.uuid4().hex[:8]}"

    return make


# ======================================================================================================
# 3. Non-Hub tests (datasets, runs and the tiny subtask of section 4)
# ======================================================================================================
# hf_d3.data reads HF_D3_CACHE when it is imported: point it at a session temp dir before any test module imports
# hf_d3, so no test reads or writes the user's ~/.cache/hf_d3. Subprocesses (accelerate launch) inherit it, and the
# allocator settings (see the Makefile) that make torch on CPU much faster (glibc reads them at process start).
HF_D3_CACHE = tempfile.mkdtemp(prefix="hf_d3-tests-cache-")
atexit.register(shutil.rmtree, HF_D3_CACHE, ignore_errors=True)
os.environ["HF_D3_CACHE"] = HF_D3_CACHE
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "4294967296")
os.environ.setdefault("MALLOC_TOP_PAD_", "1073741824")
# One intra-op thread (read by torch when it is first imported, and by `accelerate launch` for its ranks): the test
# networks are tiny, and on a busy 2-core machine a second OpenMP thread spin-waiting for a core made a 3-iteration
# distillation 80x slower (9.4 s instead of 0.12 s). It also gives every process the same reduction order, so the
# 1-process and 2-process runs of test_federated_runs can be compared bit for bit.
os.environ["OMP_NUM_THREADS"] = "1"

FMNIST4_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress"]  # Fashion-MNIST classes 0-3
FMNIST4_TRAIN_PER_CLASS = 24
FMNIST4_TEST_PER_CLASS = 25


def write_parquet_dataset(folder: Path, splits: dict) -> Path:
    """Write `{split: datasets.Dataset}` in the layout of a Hub dataset repo (`data/<split>-00000-of-00001.parquet`),
    which `datasets.load_dataset(str(folder))` reads back with the features (Image, ClassLabel) intact."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, dataset in splits.items():
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="session")
def fmnist4_splits():
    """Real Fashion-MNIST images (from the Debian package's t10k IDX files) of classes 0-3, as `datasets.Dataset`s
    with Image + ClassLabel features: {"train": 24 per class, "test": 25 other images per class}."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image

    from hf_d3.data import FASHION_MNIST_DIR, _read_idx

    images = _read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    features = Features({"image": Image(), "label": ClassLabel(names=FMNIST4_CLASSES)})

    def split(start: int, per_class: int) -> Dataset:
        index = np.concatenate([np.flatnonzero(labels == c)[start:start + per_class] for c in range(4)])
        return Dataset.from_dict({"image": list(images[index]), "label": labels[index].tolist()}, features=features)

    return {"train": split(0, FMNIST4_TRAIN_PER_CLASS), "test": split(100, FMNIST4_TEST_PER_CLASS)}


@pytest.fixture(scope="session")
def fmnist4_folder(tmp_path_factory, fmnist4_splits) -> Path:
    """`fmnist4_splits` as a local dataset folder (Parquet, Hub repo layout), its `load_dataset` cache already built
    (in this session's HF_HOME, which subprocesses share) so concurrent ranks only read it."""
    from datasets import load_dataset

    folder = write_parquet_dataset(tmp_path_factory.mktemp("fmnist4"), fmnist4_splits)
    for split in fmnist4_splits:
        load_dataset(str(folder), split=split)
    return folder


@pytest.fixture(scope="session")
def fmnist4_tensors(fmnist4_folder):
    """The train split of `fmnist4_folder` at 16x16, grayscale, as `hf_d3.data.RealImages` (images read from the
    image cache on demand)."""
    from hf_d3.data import load_image_dataset, load_images

    return load_images(load_image_dataset(str(fmnist4_folder), "train"), resolution=16, channels=1)


# A whole distillation run in seconds: 16x16 images, ConvNet-D2 of width 8, one expert of 2 epochs, 2 iterations.
TINY_RUN = {
    "resolution": 16,
    "channels": 1,
    "max_train_per_class": 20,
    "max_test_examples": 60,
    "seed": 0,
    "architecture": "convnet",
    "net_width": 8,
    "net_depth": 2,
    "num_experts": 1,
    "trajectory_epochs": 2,
    "expert_batch_size": 32,
    "latents_per_class": 2,
    "latent_dim": 8,
    "decoder_channels": [8, 8, 8],
    "init_steps": 5,
    "iterations": 2,
    "syn_steps": 2,
    "expert_epochs": 1,
    "max_start_epoch": 1,
    "mmd_samples_per_class": 4,
    "teacher_epochs": 2,
    "eval_steps": 4,
    "eval_batch_size": 64,
    "eval_seeds": 1,
}


from own_data import PNG_CLASSES, write_png_folder  # noqa: E402, F401  (the stand-in of benchmarks/own_data.py)


@pytest.fixture
def tiny_run(fmnist4_folder):
    """A factory of tiny `D3Config`s on `fmnist4_folder`: `tiny_run(output_dir=..., num_subtasks=2)`."""
    from hf_d3.config import D3Config

    def make(**overrides) -> D3Config:
        return D3Config.from_dict({"dataset": str(fmnist4_folder), **TINY_RUN, **overrides})

    return make


def stage_folders(stage_dir: Path, kind: str) -> list[Path]:
    """The complete stage folders of `kind` ("experts", "subtasks", "teacher", "evaluations") under `stage_dir`, by
    name (`hf_d3.stages`)."""
    return sorted(marker.parent for marker in (Path(stage_dir) / kind).glob("*/stage.json"))


def tiny_plan(config, class_names=tuple(FMNIST4_CLASSES)):
    """The `RunPlan` of a tiny run of `config` on `fmnist4_folder`'s four classes (full precision)."""
    from hf_d3.run_plan import make_plan

    return make_plan(config, list(class_names), "no")


# ======================================================================================================
# 4. A tiny subtask of TINY_RUN's sizes: networks, latents and decoder, real images and one expert
# ======================================================================================================
def make_net(num_labels: int = 4):
    """A ConvNet-D2 of width 8 for 16x16 grayscale images."""
    from hf_d3 import build_classifier

    return build_classifier("convnet", num_channels=1, image_size=16, num_labels=num_labels, width=8, depth=2)


def make_store_and_decoder(seed: int = 0, class_ids=(0, 1, 2, 3)):
    """A seeded (GaussianLatentStore, D3Decoder): 2 latents of 8 dims per class, decoded to 16x16 grayscale."""
    import torch

    from hf_d3 import D3Decoder, GaussianLatentStore

    torch.manual_seed(seed)
    store = GaussianLatentStore(list(class_ids), num_classes=4, latents_per_class=2, latent_dim=8)
    decoder = D3Decoder(latent_dim=8, resolution=16, out_channels=1, channels=[8, 8, 8])
    return store, decoder


@pytest.fixture(scope="module")
def data(fmnist4_tensors):
    """Real Fashion-MNIST images of the 4 classes, one subtask (local labels = global ids here)."""
    from hf_d3.data import RealImages

    return RealImages(fmnist4_tensors.images, fmnist4_tensors.labels, [0, 1, 2, 3])


@pytest.fixture(scope="module")
def trajectory(data):
    """One expert trained 2 epochs on the real data: (network, trajectory [3, num_params])."""
    import torch

    from hf_d3.experts import train_classifier

    torch.manual_seed(0)
    net = make_net()
    steps = train_classifier(net, data.images, data.labels, epochs=2, lr=0.01, batch_size=32,
                             generator=torch.Generator().manual_seed(0), augment=False)
    return net, torch.stack(steps)
