"""The package's shape: its modules import one another in one direction only (no circle, even through imports
deferred into functions), and none grows past a screenful of screens."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hf_d3"
MAX_LINES = 320


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


def test_the_pipeline_and_models_do_not_reach_up():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    high = {"hf_d3.hub", "hf_d3.cards", "hf_d3.run", "hf_d3.federated", "hf_d3.run_folder"}
    # the pipeline's push_to_hub is the D3 publish (diffusers' convention): it alone may reach hf_d3.hub
    allowed = {"hf_d3.pipelines.pipeline_d3": {"hf_d3.hub"}}
    for low in ("hf_d3.pipelines.pipeline_d3", "hf_d3.models.decoder", "hf_d3.models.latent_store", "hf_d3.storage"):
        imported = imported_modules(paths[low], set(paths))
        assert not imported & (high - allowed.get(low, set())), (low, imported)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_modules_stay_short(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
