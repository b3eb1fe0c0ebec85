"""Image-classification data through `datasets`, as normalised-free tensors in [0, 1].

Any Hub id or local folder that `datasets.load_dataset` reads works; the image and label columns are
found by their feature types unless named. `builtin:fashion_mnist` reads the IDX files of the Debian
package `dataset-fashion-mnist` into a real `datasets.Dataset` (the offline default).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image

from .atomic import staged
from .config import DataConfig

FASHION_MNIST = "builtin:fashion_mnist"
FASHION_MNIST_DIR = Path(os.environ.get("HF_D3_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CACHE_DIR = Path(os.environ.get("HF_D3_CACHE", Path.home() / ".cache" / "hf_d3"))
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class SubtaskData:
    """The real data of one subtask; `labels` are local (0..n-1), `class_ids` maps them to global ids."""

    images: torch.Tensor
    labels: torch.Tensor
    class_ids: list[int]


@dataclass
class ImageTensors:
    """Images [N, C, H, W] in [0, 1] with their global class ids and the dataset's class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def of_class(self, class_id: int) -> torch.Tensor:
        return self.images[self.labels == class_id]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_offline(split: str) -> Dataset:
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
        return fashion_mnist_offline(split)
    dataset = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset {name!r} split {split!r} is not a map-style Dataset")
    return dataset


def class_names_of(data: DataConfig, train: Dataset | None = None) -> list[str]:
    """The class names of the config's dataset: its train split's label feature (`train`, loaded if not given)."""
    if train is None and data.dataset == FASHION_MNIST:
        return list(FASHION_MNIST_CLASSES)
    train = train if train is not None else load_image_dataset(data.dataset, data.train_split)
    return list(train.features[find_columns(train, data.image_column, data.label_column)[1]].names)


def find_columns(
    dataset: Dataset, image_column: str | None = None, label_column: str | None = None
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


def to_tensors(
    dataset: Dataset,
    resolution: int,
    channels: int,
    classes: Sequence[int] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> ImageTensors:
    """Decode a dataset into [0, 1] tensors at `resolution` with `channels` (1 or 3).

    Only `classes` are kept (filtered before any image is decoded, so memory follows the kept classes);
    `max_per_class` keeps a seeded random subset of each class.
    """
    image_column, label_column = find_columns(dataset, image_column, label_column)
    class_names = list(dataset.features[label_column].names)
    labels = np.asarray(dataset[label_column])
    keep = np.arange(len(labels)) if classes is None else np.flatnonzero(np.isin(labels, list(classes)))
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        keep = np.concatenate([rng.permutation(keep[labels[keep] == c])[:max_per_class]
                               for c in np.unique(labels[keep])])
        keep.sort()
    mode = {1: "L", 3: "RGB"}[channels]
    subset = dataset.select(keep).select_columns([image_column])
    images = np.empty((len(keep), resolution, resolution, channels), dtype=np.uint8)
    for i, image in enumerate(subset[image_column]):
        image = image.convert(mode)
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), resample=3)  # bicubic
        images[i] = np.asarray(image).reshape(resolution, resolution, channels)
    return ImageTensors(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255),
        labels=torch.from_numpy(labels[keep]).long(),
        class_names=class_names,
    )


def load_subtask_data(train: Dataset, data: DataConfig, class_ids: list[int], seed: int,
                      device: torch.device | str = "cpu") -> SubtaskData:
    """The real images of one subtask's classes only (at most `max_train_per_class` each, picked by `seed`), with
    local labels 0..n-1."""
    real = to_tensors(train, data.resolution, data.channels, classes=class_ids, image_column=data.image_column,
                      label_column=data.label_column, max_per_class=data.max_train_per_class, seed=seed)
    local = torch.searchsorted(torch.tensor(class_ids), real.labels)
    return SubtaskData(real.images.to(device), local.to(device), class_ids)


def load_test_split(data: DataConfig) -> ImageTensors:
    """The real test split the students are scored on (its first `max_test_examples` images, if set)."""
    test = to_tensors(load_image_dataset(data.dataset, data.test_split), data.resolution, data.channels,
                      image_column=data.image_column, label_column=data.label_column)
    if data.max_test_examples:
        test = ImageTensors(test.images[:data.max_test_examples], test.labels[:data.max_test_examples],
                            test.class_names)
    return test
