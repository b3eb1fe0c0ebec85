"""Nothing untrusted is unpickled, and the Hub token goes nowhere but to the Hub.

The pickle scan reads the code with `ast`: no `torch.load` without `weights_only=True`, no import of a pickle
library, no `np.load(..., allow_pickle=True)`, and torch.distributed's object collectives (which pickle) only in
`hf_d3.federated`, under its comment that names them trusted, rank to rank only.

The token tests publish with the token of the local test Hub set (`HF_TOKEN`, tests/conftest.py) and look for it in
every file written (the run folder, the whole HF cache with its card copies, what the Hub stored), in the logs and
the output, and in the errors of publishes that fail.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import traceback
import uuid
from pathlib import Path

import pytest
import torch
from conftest import HUB_TOKEN

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore
from hf_d3.hub import HubPublishError
from hf_d3.run import run_distillation
from hf_d3.run_folder import publish_run

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [ROOT / "src" / "hf_d3", ROOT / "recipes", ROOT / "benchmarks"]
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}
OBJECT_COLLECTIVES = {"all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                      "send_object_list", "recv_object_list"}
# The one module allowed object collectives, and the words that must stand in it.
TRUSTED = {"src/hf_d3/federated.py": "TRUSTED, RANK TO RANK ONLY"}


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unpickling(source: str, path: str) -> list[str]:
    """`path:line: what` for every way `source` could unpickle."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in [a.name for a in node.names]:
                found.append(f"{where}: imports torch's load by name (call torch.load with weights_only=True)")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        name = func.rpartition(".")[2]
        if func in ("torch.load", "torch.serialization.load") and not _keyword_is(node, "weights_only", True):
            found.append(f"{where}: {func} without weights_only=True")
        pickles = [k for k in node.keywords if k.arg == "allow_pickle"] and not _keyword_is(node, "allow_pickle", False)
        if name == "load" and func.split(".")[0] in ("np", "numpy") and pickles:
            found.append(f"{where}: {func} with allow_pickle")
        if name in ("read_pickle", "loads") and func.split(".")[0] in ("pd", "pandas", "pickle"):
            found.append(f"{where}: {func}")
        if name in OBJECT_COLLECTIVES and TRUSTED.get(path, "\0") not in source:
            found.append(f"{where}: {func} pickles, outside the trusted rank-to-rank place {list(TRUSTED)}")
    return found


def test_the_scan_finds_each_way_to_unpickle():
    source = "\n".join([
        "import pickle", "import dill as d", "from cloudpickle import loads", "import torch, numpy as np",
        "torch.load('a')", "torch.load('a', weights_only=False)", "torch.load('a', weights_only=True)",
        "np.load('a.npy', allow_pickle=True)", "np.load('a.npy')", "import torch.distributed as dist",
        "dist.all_gather_object([], 1)", "dist.recv_object_list([None], src=0)",
    ])
    found = [line.split(": ", 1)[1] for line in unpickling(source, "x.py")]
    assert found == ["imports pickle", "imports dill", "imports cloudpickle", "torch.load without weights_only=True",
                     "torch.load without weights_only=True", "np.load with allow_pickle",
                     "dist.all_gather_object pickles, outside the trusted rank-to-rank place "
                     "['src/hf_d3/federated.py']",
                     "dist.recv_object_list pickles, outside the trusted rank-to-rank place "
                     "['src/hf_d3/federated.py']"]


def test_nothing_untrusted_is_unpickled():
    paths = sorted(p for folder in SCANNED if folder.is_dir() for p in folder.rglob("*.py"))
    assert len(paths) > 30
    found = [f for p in paths for f in unpickling(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert not found, "unpickling found:\n" + "\n".join(found)
    trusted = (ROOT / "src/hf_d3/federated.py").read_text()
    assert any(name in trusted for name in OBJECT_COLLECTIVES)  # the trusted place is where they really are


# ----------------------------------------------------------------------------------------------------------
# The token
# ----------------------------------------------------------------------------------------------------------


def files_holding(token: str, *folders: Path) -> list[str]:
    needle = token.encode()
    return [str(p) for folder in folders for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_a_run_that_publishes_writes_its_token_nowhere(local_hub, new_repo_id, tiny_run, tmp_path, caplog, capfd):
    """push_to_hub at the end of a run: the pipeline, and its dataset under the same id (a dataset repo is another
    repo than the model repo of that name, as on the real Hub)."""
    assert os.environ["HF_TOKEN"] == HUB_TOKEN == local_hub.token  # what the clients send
    caplog.set_level(logging.DEBUG)
    repo_id = new_repo_id("d3-secret")
    output_dir = tmp_path / "run"
    run_distillation(tiny_run(output_dir=str(output_dir), push_to_hub=True, hub_model_id=repo_id,
                              hub_dataset_id=repo_id))
    assert local_hub.commit_ids(repo_id, "model") and local_hub.commit_ids(repo_id, "dataset")  # both published
    uploaded = {**local_hub.files(repo_id, "model"), **local_hub.files(repo_id, "dataset")}
    assert "README.md" in uploaded and "model_index.json" in uploaded
    assert not [name for name, data in uploaded.items() if HUB_TOKEN.encode() in data]
    cache = Path(os.environ["HF_HOME"])
    assert list(cache.rglob("README.md"))  # the card copies the publish downloaded are there to be searched
    assert files_holding(HUB_TOKEN, output_dir, cache, local_hub.root) == []
    out, err = capfd.readouterr()
    assert HUB_TOKEN not in caplog.text + out + err
    assert "Published the D3 pipeline" in caplog.text  # the logs were captured


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A finished run folder, by hand: pipeline, metrics.json, config.json."""
    torch.manual_seed(0)
    store = GaussianLatentStore(class_ids=[0, 1, 2], num_classes=3, latents_per_class=2, latent_dim=8)
    pipe = D3Pipeline(latent_store=store, decoder=D3Decoder(latent_dim=8, resolution=8, out_channels=1,
                                                            channels=[8, 8]))
    pipe.save_pretrained(tmp_path / "run" / "pipeline")
    metrics = {"accuracy_mean": 0.5, "accuracy_std": 0.01, "num_eval_runs": 2, "student_architecture": "convnet",
               "distill_wall_time_s": 1.0, "distill_peak_memory_bytes": 2**20}
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "run" / "config.json").write_text(json.dumps({"dataset": "builtin:fashion_mnist"}))
    return tmp_path / "run"


@pytest.mark.parametrize("method, path, status, disconnect", [
    ("POST", r"^/api/models/.*/commit/", 500, False),  # the Hub refuses the pipeline's commit
    ("POST", r"^/api/datasets/.*/preupload/", 400, False),  # the dataset's upload, after the pipeline went through
    ("POST", r"^/api/models/.*/commit/", 500, True),  # the connection drops while the commit is sent
], ids=["pipeline-commit-500", "dataset-preupload-400", "commit-dropped"])
def test_a_failing_publish_says_nothing_of_its_token(local_hub, run_folder, caplog, capfd, monkeypatch, method, path,
                                                     status, disconnect):
    """The token passed explicitly (HF_TOKEN unset): neither the error, its causes, nor the logs carry it."""
    monkeypatch.delenv("HF_TOKEN")
    caplog.set_level(logging.DEBUG)
    repo_id = f"{local_hub.user}/d3-failing-{uuid.uuid4().hex[:8]}"
    with local_hub.fault(method, path, status=status, disconnect=disconnect, times=None) as fault:
        with pytest.raises(HubPublishError) as error:
            publish_run(run_folder, repo_id, repo_id, token=HUB_TOKEN)
    assert fault.hits >= 1 and repo_id in str(error.value)
    shown = "".join(traceback.format_exception(error.value))  # with every chained cause, as a user sees it
    out, err = capfd.readouterr()
    assert HUB_TOKEN not in shown + repr(error.value) + caplog.text + out + err
    assert files_holding(HUB_TOKEN, run_folder, Path(os.environ["HF_HOME"]), local_hub.root) == []
