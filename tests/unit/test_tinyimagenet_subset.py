"""The carryable Tiny ImageNet subset (benchmarks/tinyimagenet_subset.py), on a tiny stand-in of the shared folder's
layout: the picked rows, their image bytes unchanged, and the class names, read back by `datasets` as a run reads it.
(The benchmark that uses it runs on a GPU machine: docs/gpu.md.)"""

import io

import datasets
import numpy as np
from PIL import Image
from tinyimagenet_subset import write_split  # benchmarks/ is on pytest's pythonpath

NAMES = ["goldfish", "bullfrog", "koala"]


def jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_the_subset_keeps_the_picked_images_byte_for_byte_and_the_class_names(tmp_path):
    source, out = tmp_path / "source", tmp_path / "subset"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    for split, per_class in (("train", 4), ("test", 2)):
        rows = [(jpeg(10 * i + c), c) for c in range(3) for i in range(per_class)]
        (source / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b, _ in rows],
                                    "label": [c for _, c in rows]}, features=features).to_parquet(
            source / "data" / f"{split}-00000-of-00001.parquet")
    write_split(source, "train", 2, 0, out)
    write_split(source, "test", None, 0, out)

    subset = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert subset["train"].features["label"].names == NAMES
    assert sorted(subset["train"]["label"]) == [0, 0, 1, 1, 2, 2]
    assert subset["test"]["label"] == [0, 0, 1, 1, 2, 2]  # the whole split, in its order
    sources = {jpeg(10 * i + c) for c in range(3) for i in range(4)}
    kept = subset["train"].cast_column("image", datasets.Image(decode=False))["image"]
    assert len({image["bytes"] for image in kept}) == 6 and {image["bytes"] for image in kept} <= sources
