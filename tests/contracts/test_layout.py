"""The package's shape: its modules import one another in one direction only (no circle, even through imports
deferred into functions), its user-facing half never loads its training half, and no module grows past a
screenful of screens."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

from hf_d3 import D3Decoder, D3Pipeline, GaussianLatentStore

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "hf_d3"
MAX_LINES = 320
# The user-facing half: what loading, drawing from and publishing a distilled dataset runs. A user of a published
# dataset needs nothing of the training half (run, distill, data, experts, preflight, sizing, ...), so these import
# none of it, not even inside a function.
USER_FACING_PACKAGES = ("hf_d3.models", "hf_d3.pipelines")
USER_FACING_MODULES = {"hf_d3", "hf_d3.cards", "hf_d3.hub", "hf_d3.precision", "hf_d3.quantization",
                       "hf_d3.remote_code", "hf_d3.results", "hf_d3.sample_grid", "hf_d3.storage", "hf_d3.version"}


def user_facing(name: str) -> bool:
    return name in USER_FACING_MODULES or any(name == p or name.startswith(p + ".") for p in USER_FACING_PACKAGES)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The hf_d3 modules `path` imports anywhere in its body (TYPE_CHECKING-only imports excluded)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and ast.unparse(block.test) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.ImportFrom | ast.Import):
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        found |= {name for name in names if name in modules}
    return found - {module_name(path)}


def test_no_import_circle():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items()}

    def circle_from(start: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return (*path, start)
            if nxt not in path and not nxt.startswith(start + "."):  # a package importing its own modules is fine
                found = circle_from(start, (*path, nxt))
                if found:
                    return found
        return None

    for name in sorted(graph):
        if name.endswith("__init__") or "." not in name or any(p.startswith(name + ".") for p in graph):
            continue  # packages re-export their modules; the modules themselves are checked
        circle = circle_from(name, (name,))
        assert circle is None, " -> ".join(circle)


def test_the_pipeline_and_models_do_not_reach_up_to_publishing():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    high = {"hf_d3.hub", "hf_d3.cards"}
    # the pipeline's push_to_hub is the D3 publish (diffusers' convention): it alone may reach hf_d3.hub
    allowed = {"hf_d3.pipelines.pipeline_d3": {"hf_d3.hub"}}
    for low in ("hf_d3.pipelines.pipeline_d3", "hf_d3.models.decoder", "hf_d3.models.latent_store", "hf_d3.storage"):
        imported = imported_modules(paths[low], set(paths))
        assert not imported & (high - allowed.get(low, set())), (low, imported)


def test_the_user_facing_half_never_imports_the_training_half():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items()}

    def with_parents(name: str) -> set[str]:  # importing a module runs its packages' __init__ first
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}

    for start in sorted(filter(user_facing, graph)):
        came_from, queue = {start: None}, deque([start])
        while queue:
            name = queue.popleft()
            for nxt in sorted(set().union(*map(with_parents, graph[name])) - came_from.keys()):
                came_from[nxt] = name
                queue.append(nxt)
        for reached in sorted(name for name in came_from if not user_facing(name)):
            chain = [reached]
            while came_from[chain[-1]]:
                chain.append(came_from[chain[-1]])
            pytest.fail(f"the user-facing {start} imports the training module {reached}: {' -> '.join(chain[::-1])}")


def test_loading_drawing_and_publishing_a_pipeline_import_no_training_module(local_hub, new_repo_id, tmp_path):
    store = GaussianLatentStore(class_ids=[0, 1], num_classes=2, latents_per_class=2, latent_dim=8)
    D3Pipeline(latent_store=store, decoder=D3Decoder(latent_dim=8, resolution=8, out_channels=1, channels=[8, 4])
               ).save_pretrained(tmp_path / "pipe")
    repo_id = new_repo_id("d3-layers")
    script = f"""
import json, sys
import torch
from hf_d3 import D3Pipeline
pipe = D3Pipeline.from_pretrained({str(tmp_path / "pipe")!r})
pipe(num_samples_per_component=2, include_means=True, generator=torch.Generator().manual_seed(0))
pipe.push_to_hub({repo_id!r})
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == "hf_d3")))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.splitlines()[-1])
    assert "hf_d3.hub" in loaded and len(local_hub.commit_ids(repo_id)) == 2  # it published: one commit on the first
    assert [name for name in loaded if not user_facing(name)] == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_modules_stay_short(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
