"""A generated stand-in of 64x64 ImageNet-1K's shape: 1,000 classes of RGB JPEGs in a local `datasets` folder.

    python benchmarks/imagenet_stand_in.py --per_class 300 --output_dir outputs/stand_in/imagenet_300

Every class has its own pattern (a colour, a grating of its own frequency and orientation, a blob at its own place);
every image of it shifts the grating's phase and adds noise, so classes are learnable and images differ. The images
are JPEG-encoded as ImageNet's are (decoding them is part of what a data path costs) and written as Parquet shards in
the layout of a Hub dataset repo (`data/train-0000k-of-000n.parquet`), which `datasets.load_dataset(folder)` reads.
The `load_dataset` Arrow cache is built at the end, so a benchmark that loads the folder afterwards measures the
data path, not the one-off Parquet conversion.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import PIL.Image
from datasets import ClassLabel, Dataset, Features, Image, load_dataset

CLASSES_PER_SHARD = 50


def class_images(class_id: int, count: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """`count` uint8 [resolution, resolution, 3] images of class `class_id`'s pattern."""
    own = np.random.default_rng(class_id)  # the class's pattern: the same whatever the image count
    colour = own.uniform(40, 215, 3)
    frequency, angle = own.uniform(1, 6), own.uniform(0, np.pi)
    centre, radius = own.uniform(0.2, 0.8, 2) * resolution, own.uniform(0.1, 0.3) * resolution
    y, x = np.mgrid[:resolution, :resolution].astype(np.float32)
    along = (np.cos(angle) * x + np.sin(angle) * y) / resolution
    blob = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 < radius**2).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (count, 1, 1))
    grating = 50 * np.sin(2 * np.pi * frequency * along[None] + phase)
    images = colour[None, None, None] + (grating + 40 * blob[None])[..., None] * np.array([1.0, -0.5, 0.5])
    images = images + rng.normal(0, 12, images.shape)
    return images.clip(0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> dict:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return {"bytes": buffer.getvalue(), "path": None}


def write_stand_in(folder: Path, num_classes: int, per_class: int, test_per_class: int, resolution: int = 64,
                   seed: int = 0) -> Path:
    """Write the train and test splits of the stand-in to `folder` and build their `load_dataset` cache."""
    features = Features({"image": Image(), "label": ClassLabel(names=[f"class_{c:04d}" for c in range(num_classes)])})
    rng = np.random.default_rng(seed)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    shards = range(0, num_classes, CLASSES_PER_SHARD)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for k, first in enumerate(shards):
            classes = range(first, min(first + CLASSES_PER_SHARD, num_classes))
            images = [jpeg(im) for c in classes for im in class_images(c, count, resolution, rng)]
            labels = [c for c in classes for _ in range(count)]
            Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
                str(folder / "data" / f"{split}-{k:05d}-of-{len(shards):05d}.parquet"))
    for split in ("train", "test"):
        load_dataset(str(folder), split=split)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--per_class", type=int, default=300, help="training images per class")
    parser.add_argument("--test_per_class", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    start = time.perf_counter()
    write_stand_in(args.output_dir, args.num_classes, args.per_class, args.test_per_class, args.resolution)
    print(f"{args.num_classes} classes x {args.per_class} training images at {args.resolution}x{args.resolution} "
          f"written to {args.output_dir} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
