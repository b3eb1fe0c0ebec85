"""Image-classification data through `datasets`, decoded once into an on-disk uint8 cache read batch by batch.

Any Hub id or local folder that `datasets.load_dataset` reads works; the image and label columns are
found by their feature types unless named. `builtin:fashion_mnist` reads the IDX files of the Debian
package `dataset-fashion-mnist` into a real `datasets.Dataset` (the offline default).

The images of a split are decoded and resized once per (split, resolution, channels) into an `ImageCache`: a
uint8 NumPy file `images.npy` [N, H, W, C] in the dataset's order, its labels and a per-class index, under
`$HF_D3_CACHE/images` (default `~/.cache/hf_d3/images`). Runs, ranks and reruns share it. Everything that trains on
real images (experts, MMD, warm start, teacher, students' test) receives them as `RealImages`, whose images are a
`CachedImages` indexed like a float tensor: it gets only the images it asked for, read from the file, so a process
holds its batch, not every image it owns.

The loaders: `load_image_dataset` (a dataset by name) and `load_split` (a run's split, streamed if asked) give the
source; `load_images` (any selection of it), `load_subtask_images` (a subtask's block, local labels) and
`load_test_images` (what students are scored on) give `RealImages`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image, IterableDataset
from filelock import FileLock

import hf_d3.cache_builder as cache_builder  # the module, so tests can replace its builders

from .atomic import staged
from .cached_images import CACHE_FORMAT, CachedImages, ImageCache  # noqa: F401  (consumers import them from here)
from .config import DataConfig
from .real_images import RealImages

FASHION_MNIST = "builtin:fashion_mnist"
FASHION_MNIST_DIR = Path(os.environ.get("HF_D3_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CACHE_DIR = Path(os.environ.get("HF_D3_CACHE", Path.home() / ".cache" / "hf_d3"))
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def cache_folder(source: str, split: str | None, resolution: int, channels: int, image_column: str,
                 label_column: str) -> Path:
    """Where the cache of `source` (a dataset's fingerprint, or a name for a stream) at these settings lives."""
    key = json.dumps([CACHE_FORMAT, source, image_column, label_column, resolution, channels])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return CACHE_DIR / "images" / f"{split or 'split'}-{resolution}px-{channels}ch-{digest}"


def image_cache(dataset: Dataset | IterableDataset, resolution: int, channels: int, image_column: str | None = None,
                label_column: str | None = None, source: str | None = None,
                num_workers: int | None = None) -> ImageCache:
    """The `ImageCache` of `dataset` at `resolution` with `channels` (1 or 3): opened if built, else built first.

    A map-style `Dataset` is keyed by its fingerprint (so a changed dataset gets a new cache) and decoded by
    `num_workers` processes (default: the cores this process may use). A streaming `IterableDataset` has no
    fingerprint: `source` names it (e.g. "user/data:train"); under a launcher (`RANK`, `WORLD_SIZE`) every rank
    decodes its share (`datasets.distributed.split_dataset_by_node`) and one of them joins the shares, so all ranks
    must call this together and see the same cache folder (one machine, or a shared filesystem).

    One process builds while the others wait on a file lock, then open what it built; the cache appears under its
    final name only once complete (`hf_d3.atomic.staged`), so a build killed halfway leaves nothing that looks
    finished and the next call builds again.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels} is not supported; valid: 1 (grayscale) or 3 (RGB)")
    image_column, label_column = find_columns(dataset, image_column, label_column)
    streaming = isinstance(dataset, IterableDataset)
    if streaming and source is None:
        raise ValueError("a streaming dataset has no fingerprint: name it with source= (e.g. the Hub id and split)")
    folder = cache_folder(source or dataset._fingerprint, dataset.split, resolution, channels, image_column,
                          label_column)
    if (folder / "meta.json").is_file():
        return ImageCache(folder)
    args = (folder, resolution, channels, image_column, label_column)
    if streaming:
        cache_builder.build_from_stream(dataset, *args)
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):  # one builder per machine (and per shared filesystem)
            if not (folder / "meta.json").is_file():
                cache_builder.build_from_dataset(dataset, *args, num_workers or len(os.sched_getaffinity(0)))
    return ImageCache(folder)


# ------------------------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(split: str) -> Dataset:
    """Fashion-MNIST `split` ("train" or "test") from the Debian package, with Image/ClassLabel features."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split; valid: 'train', 'test'")
    images_file = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images_file.is_file():
        raise FileNotFoundError(
            f"{images_file} not found: install the Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist), or name the Hub dataset zalando-datasets/fashion_mnist"
        )
    # Encoding 60k PNGs takes ~15 s: keep the Arrow files, as `load_dataset` keeps its cache.
    cached = CACHE_DIR / "fashion_mnist" / split
    if (cached / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(cached))
    images = _read_idx(images_file)
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    dataset = Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
    with staged(cached, replace=False) as staging:  # concurrent ranks never read a half-written cache
        dataset.save_to_disk(str(staging))
    return datasets.load_from_disk(str(cached))


def load_image_dataset(name: str, split: str, cache_dir: str | None = None) -> Dataset:
    """Load `split` of an image-classification dataset: a Hub id, a local folder, or `builtin:fashion_mnist`."""
    if name == FASHION_MNIST:
        return _fashion_mnist(split)
    dataset = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset {name!r} split {split!r} is not a map-style Dataset")
    return dataset


def load_split(data: DataConfig, split: str) -> Dataset | ImageCache:
    """A split as a run reads it: the map-style `Dataset` (its image cache is built on first use), or with
    `streaming`, the `ImageCache` its stream feeds, built here by every rank together (`image_cache`)."""
    if not data.streaming:
        return load_image_dataset(data.dataset, split)
    if data.dataset == FASHION_MNIST:
        raise ValueError(f"streaming=True reads {data.dataset!r} with datasets.load_dataset, but it is read from "
                         "local files; valid: streaming=False, or a Hub id or local folder")
    stream = datasets.load_dataset(data.dataset, split=split, streaming=True)
    return image_cache(stream, data.resolution, data.channels, data.image_column, data.label_column,
                       source=f"{data.dataset}:{split}")


def class_names_of(data: DataConfig, train: Dataset | ImageCache | None = None) -> list[str]:
    """The class names of the config's dataset: its train split's label feature (`train`; if not given, read from
    the split's metadata, streamed, so nothing but the metadata is downloaded where the dataset declares it)."""
    if train is None and data.dataset == FASHION_MNIST:
        return list(FASHION_MNIST_CLASSES)
    if isinstance(train, ImageCache):
        return list(train.class_names)
    if train is None:
        train = datasets.load_dataset(data.dataset, split=data.train_split, streaming=True)
        if train.features is None:  # a format whose features show only once read
            train = load_image_dataset(data.dataset, data.train_split)
    return list(train.features[find_columns(train, data.image_column, data.label_column)[1]].names)


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes of one grey channel (with alpha: "LA")


def image_shape_of(data: DataConfig) -> tuple[int, int]:
    """The side (the shorter one) and channels (1 for a grayscale mode, else 3) of the config's first training
    image, read from the stream of its train split, so nothing but that image is downloaded."""
    if data.dataset == FASHION_MNIST:
        return 28, 1
    train = datasets.load_dataset(data.dataset, split=data.train_split, streaming=True)
    if train.features is None:  # a format whose features show only once read
        train = load_image_dataset(data.dataset, data.train_split)
    image = next(iter(train))[find_columns(train, data.image_column, data.label_column)[0]]
    return min(image.size), 1 if image.mode in GRAYSCALE_MODES else 3


def find_columns(
    dataset: Dataset | IterableDataset, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """The image and label columns: the named ones, else the first `Image` and `ClassLabel` features."""
    features = dataset.features
    if image_column is None:
        image_column = next((k for k, f in features.items() if isinstance(f, Image)), None)
    if label_column is None:
        label_column = next((k for k, f in features.items() if isinstance(f, ClassLabel)), None)
    # Labels as strings or plain integers do not say the classes and their order: they must be a ClassLabel.
    encode = {"image": "", "label": "; class names or ids in a plain column must be cast to a ClassLabel first "
                                    "(datasets: Dataset.class_encode_column(name), then save the dataset)"}
    for kind, column, wanted in (("image", image_column, Image), ("label", label_column, ClassLabel)):
        if column is None or column not in features:
            raise ValueError(
                f"no {kind} column {'named ' + repr(column) + ' ' if column else ''}in the dataset; its columns are "
                f"{ {k: type(f).__name__ for k, f in features.items()} }; name one with {kind}_column{encode[kind]}"
            )
        if not isinstance(features[column], wanted):
            found = type(features[column]).__name__
            raise ValueError(f"{kind} column {column!r} is a {found}, not a {wanted.__name__}{encode[kind]}")
    return image_column, label_column


def load_images(
    dataset: Dataset | ImageCache,
    resolution: int,
    channels: int,
    classes: Sequence[int] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> RealImages:
    """The images of a dataset at `resolution` with `channels` (1 or 3), in [0, 1], read on demand from its
    `ImageCache` (built on first use): only `classes`, at most `max_per_class` of each (a seeded random subset), the
    first `limit` of those, labelled with the dataset's class ids. `dataset` may be the cache itself (what `load_split`
    gives for a stream)."""
    if isinstance(dataset, ImageCache):
        if (dataset.resolution, dataset.channels) != (resolution, channels):
            raise ValueError(f"the image cache {dataset.folder} holds {dataset.resolution}x{dataset.resolution}x"
                             f"{dataset.channels} images, not resolution={resolution}, channels={channels}; valid: "
                             "its own resolution and channels, or the dataset instead of its cache")
        return RealImages.from_cache(dataset, classes, max_per_class, seed, limit)
    cache = image_cache(dataset, resolution, channels, image_column, label_column)
    return RealImages.from_cache(cache, classes, max_per_class, seed, limit)


def load_subtask_images(train: Dataset | ImageCache, data: DataConfig, class_ids: list[int], seed: int,
                        device: torch.device | str = "cpu") -> RealImages:
    """The real images of one subtask's classes only (`class_ids`, ascending; at most `max_train_per_class` each,
    picked by `seed`), with local labels 0..n-1; the images are read from the cache batch by batch, onto `device`."""
    real = load_images(train, data.resolution, data.channels, classes=class_ids, image_column=data.image_column,
                       label_column=data.label_column, max_per_class=data.max_train_per_class, seed=seed)
    local = torch.searchsorted(torch.tensor(class_ids), real.labels)
    return RealImages(real.images.to(device), local.to(device), list(class_ids),
                      [real.class_names[c] for c in class_ids])


def load_test_images(data: DataConfig) -> RealImages:
    """The real test split the students are scored on (its first `max_test_examples` images, if set)."""
    return load_images(load_split(data, data.test_split), data.resolution, data.channels,
                       image_column=data.image_column, label_column=data.label_column, limit=data.max_test_examples)
