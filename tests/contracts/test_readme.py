"""The README's examples run as written: each marked snippet (`tests/snippets.py`), with the demo's pipeline folder
and the example repo ids replaced by a small real pipeline and repos on the local test Hub. The snippets that moved to
docs/*.md run here or beside the code they show (`train_student`: tests/unit/test_student_training.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from snippets import DOCUMENTS, README, ROOT, shell_commands, snippets

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore
from hf_d3.config import FIELD_GROUP

DEMO_PIPELINE = "outputs/fashion_mnist/pipeline"
EXAMPLE_REPO = "user/fashion-mnist-d3"
CLASSES = ["circle", "square", "stripe"]
# The run's schedule cut to seconds; the data and the sizes stay the snippet's own (the budget chooses the sizes).
SHORT = [arg for key, value in TINY_RUN.items() if FIELD_GROUP[key] not in ("data", "representation")
         for arg in (f"--{key}", str(value))]


@pytest.fixture
def demo_pipeline(tmp_path) -> Path:
    torch.manual_seed(0)
    store = GaussianLatentStore(class_ids=[0, 1, 2], num_classes=3, latents_per_class=2, latent_dim=8,
                                class_names=["zero", "one", "two"])
    D3Pipeline(latent_store=store, decoder=D3Decoder(latent_dim=8, resolution=8, out_channels=1, channels=[8, 8])
               ).save_pretrained(tmp_path / "pipeline")
    return tmp_path / "pipeline"


def write_image_folder(folder: Path) -> None:
    """PNGs in the README's layout: `<folder>/<split>/<class>/<n>.png`, each class its own brightness."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("test", 5)):
        for c, name in enumerate(CLASSES):
            (folder / split / name).mkdir(parents=True)
            for n in range(per_class):
                pixels = (rng.random((24, 24, 3)) * 60 + 80 * c).astype(np.uint8)
                Image.fromarray(pixels).save(folder / split / name / f"{n}.png")


def test_every_readme_block_is_a_tested_snippet():
    blocks = re.findall(r"(<!-- snippet: \w+ -->\n)?```\w+\n", README.read_text())
    assert blocks and all(blocks), "a code block in README.md has no <!-- snippet: NAME --> mark, so no test runs it"
    assert set(snippets()) == {"setup", "load", "distill", "push", "publish", "stream", "train_student",
                              "two_machines"}


def test_the_setup_commands_are_the_makefiles():
    assert [command for command, *_ in shell_commands("setup")] == ["make", "make"]
    plan = subprocess.run(["make", "-n", "demo", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert plan.returncode == 0, plan.stderr
    assert "recipes/distill.py --config recipes/configs/fashion_mnist.yaml" in plan.stdout  # the demo's job
    assert "dataset-fashion-mnist" in plan.stdout and "pytest tests" in plan.stdout


def test_load_stream_and_push_snippets_run(local_hub, new_repo_id, demo_pipeline, tmp_path):
    repo_id = new_repo_id("readme")
    code = "\n".join(snippets()[name][1] for name in ("load", "stream", "push"))
    code = code.replace(DEMO_PIPELINE, str(demo_pipeline)).replace(EXAMPLE_REPO, repo_id)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "first.png").is_file() and "ipc_equivalent" in done.stdout
    assert ModelCard.load(repo_id).data.library_name == "hf_d3"  # the push went through, with the D3 card


def test_distill_your_own_images_then_publish(local_hub, new_repo_id, tmp_path):
    write_image_folder(tmp_path / "my_images")
    model_repo, data_repo = new_repo_id("my-images-d3"), new_repo_id("my-images-d3-data")
    real = {"accelerate": [sys.executable, "-m", "accelerate.commands.accelerate_cli"], "python": [sys.executable],
            "recipes/distill.py": [str(ROOT / "recipes" / "distill.py")],
            "recipes/publish.py": [str(ROOT / "recipes" / "publish.py")],
            "user/my-images-d3": [model_repo], "user/my-images-d3-data": [data_repo]}
    [distill], [publish] = shell_commands("distill"), shell_commands("publish")
    for command in ([*distill, *SHORT], publish):
        args = [real_arg for arg in command for real_arg in real.get(arg, [arg])]
        done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        assert done.returncode == 0, f"{args}\n{done.stderr[-3000:]}"

    run = tmp_path / "outputs" / "my_images"
    pipe = D3Pipeline.from_pretrained(run / "pipeline")
    assert pipe.latent_store.class_names == CLASSES
    assert pipe(output_type="pt").images.shape[1:] == (3, 24, 24)  # the resolution and channels of the PNGs
    assert json.loads((run / "metrics.json").read_text())["storage"]["ipc_equivalent"] <= 10
    assert ModelCard.load(model_repo).data.library_name == "hf_d3"
    assert any(name.endswith(".parquet") for name in HfApi().list_repo_files(data_repo, repo_type="dataset"))


def test_the_configuration_page_names_every_setting():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert [key for key in FIELD_GROUP if f"`{key}`" not in page] == []


def test_the_documents_link_to_files_that_exist():
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#:]+)\)", document.read_text()):
            assert (document.parent / target).exists(), f"{document.name} links to {target}, which is missing"
