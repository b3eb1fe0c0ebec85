"""The README's usage snippets run as written: each `<!-- snippet: NAME -->` block, with the demo's pipeline folder
and the example repo id replaced by a small real pipeline and a repo on the local test Hub."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore

README = Path(__file__).parents[1] / "README.md"
DEMO_PIPELINE = "outputs/fashion_mnist/pipeline"
EXAMPLE_REPO = "user/fashion-mnist-d3"


def snippets() -> dict[str, tuple[str, str]]:
    """{name: (language, code)} of the README's marked snippets."""
    found = re.findall(r"<!-- snippet: (\w+) -->\n```(\w+)\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return {name: (language, code) for name, language, code in found}


@pytest.fixture
def demo_pipeline(tmp_path) -> Path:
    torch.manual_seed(0)
    store = GaussianLatentStore(class_ids=[0, 1, 2], num_classes=3, latents_per_class=2, latent_dim=8,
                                class_names=["zero", "one", "two"])
    D3Pipeline(latent_store=store, decoder=D3Decoder(latent_dim=8, resolution=8, out_channels=1, channels=[8, 8])
               ).save_pretrained(tmp_path / "pipeline")
    return tmp_path / "pipeline"


def test_the_usage_snippets_are_marked():
    assert {"load", "stream", "push", "train_student"} <= set(snippets())  # train_student: test_student_training


def test_load_stream_and_push_snippets_run(local_hub, new_repo_id, demo_pipeline, tmp_path):
    repo_id = new_repo_id("readme")
    code = "\n".join(snippets()[name][1] for name in ("load", "stream", "push"))
    code = code.replace(DEMO_PIPELINE, str(demo_pipeline)).replace(EXAMPLE_REPO, repo_id)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "first.png").is_file() and "ipc_equivalent" in done.stdout
    assert ModelCard.load(repo_id).data.library_name == "hf_d3"  # the push went through, with the D3 card
