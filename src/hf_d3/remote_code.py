"""The code a published pipeline repo carries, so that `DiffusionPipeline.from_pretrained(repo_id,
trust_remote_code=True)` loads and samples it where hf_d3 is not installed.

diffusers loads a component from `<component>/<module>.py` of the repo when `model_index.json` names it
`[<module>, <class>]`, and the pipeline class from `<module>.py` at the root when `_class_name` is
`[<module>, <class>]`. The files are hf_d3's own modules as they are, never copies kept by hand: each component's
module, and for the pipeline one file of the modules it needs, their relative imports dropped (the names are
defined in that file) or, inside a function, turned into an error saying that the feature needs hf_d3.
Where hf_d3 is installed, each file hands out hf_d3's own classes instead of its copies.
"""

from __future__ import annotations

import ast
import json
from importlib import resources
from pathlib import Path

PIPELINE_MODULE = "pipeline_d3"
PIPELINE_CLASS = "D3Pipeline"
# component -> (class, hf_d3 module files that define it), in an order where every name is defined before use
COMPONENTS = {"latent_store": ("GaussianLatentStore", ["quantization.py", "models/latent_store.py"]),
              "decoder": ("D3Decoder", ["precision.py", "quantization.py", "models/decoder.py"])}
PIPELINE_SOURCES = ["quantization.py", "models/latent_store.py", "precision.py", "models/decoder.py", "storage.py",
                    "pipelines/pipeline_d3.py"]

# diffusers checks each loaded component against the pipeline's annotations, but loads the components from their own
# files: their classes are other copies than the pipeline file's, so the copy of the pipeline annotates them by base.
_ANNOTATE_BY_BASE = '''

D3Pipeline.__init__.__annotations__.update(latent_store=ModelMixin, decoder=ModelMixin)
'''
_PREFER_HF_D3 = '''

# Where hf_d3 is installed, its own classes stand in for the copies above, so `isinstance` checks hold (not an
# hf_d3 older than storage dtypes, which would misread int8 or half-precision files).
try:
    _hf_d3 = importlib.import_module("hf_d3")
    importlib.import_module("hf_d3.quantization")
except ImportError:
    pass
else:
{bindings}
'''


def standalone_source(relative_paths: list[str], classes: list[str], tail: str = "") -> str:
    """hf_d3's modules at `relative_paths` as one self-contained file that exports `classes`, `tail` appended
    before the classes are replaced by hf_d3's own where it is installed."""
    body = []
    for relative in relative_paths:
        source = resources.files("hf_d3").joinpath(relative).read_text("utf-8")
        body.append(f"# ---- hf_d3/{relative} ----\n{_without_relative_imports(source)}")
    bindings = "\n".join(f"    {name} = _hf_d3.{name}" for name in classes)
    text = ("from __future__ import annotations\n\nimport importlib\n\n" + "\n\n".join(body)
            + tail + _PREFER_HF_D3.format(bindings=bindings))
    ast.parse(text)  # a module that stops parsing once joined must fail here, not in a user's session
    return text


def _without_relative_imports(source: str) -> str:
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or not (node.level or node.module == "__future__"):
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        if node.col_offset == 0:  # module level: the names are defined in the same file
            replacement = ""
        else:
            replacement = (" " * node.col_offset + f"raise ImportError('this needs the hf_d3 package (it imports "
                           f"{'.' * node.level}{node.module or ''} of hf_d3), which is not installed')")
        lines[first:last + 1] = [replacement] + [""] * (last - first)
    return "\n".join(lines) + "\n"


def add_remote_code(folder: str | Path) -> None:
    """Write the code files into a saved pipeline folder and name them in its `model_index.json`."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for component, (class_name, sources) in COMPONENTS.items():
        (folder / component / f"{component}.py").write_text(standalone_source(sources, [class_name]))
        index[component] = [component, class_name]
    classes = [PIPELINE_CLASS, "D3PipelineOutput", *(name for name, _ in COMPONENTS.values())]
    (folder / f"{PIPELINE_MODULE}.py").write_text(standalone_source(PIPELINE_SOURCES, classes, _ANNOTATE_BY_BASE))
    index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
