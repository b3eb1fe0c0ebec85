"""Image-classification data: real local datasets read through `datasets.load_dataset`, and the offline
Fashion-MNIST of the Debian package."""

from __future__ import annotations

import gzip
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import FMNIST4_CLASSES, FMNIST4_TRAIN_PER_CLASS, HF_D3_CACHE, write_parquet_dataset
from datasets import ClassLabel, Dataset, Features, Image, Value

import hf_d3.data
from hf_d3.config import DataConfig
from hf_d3.data import FASHION_MNIST_CLASSES, class_names_of, find_columns, load_image_dataset, load_images

# ----------------------------------------------------------------------------------------------------------
# An imagefolder dataset: PNGs of mixed modes and sizes, labels from the folder names
# ----------------------------------------------------------------------------------------------------------

FOLDER_CLASSES = ["ankle", "bag", "coat"]
MODES = ["L", "RGB", "RGBA", "P"]
SIZES = [(8, 8), (12, 10), (16, 16), (5, 7)]


def gray_level(label: int, index: int) -> int:
    """Every image is one flat gray level that encodes its class and index, so the tests can tell which file an
    output tensor came from."""
    return 30 + 80 * label + 5 * index


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    for label, name in enumerate(FOLDER_CLASSES):
        (root / "train" / name).mkdir(parents=True)
        for index, (mode, size) in enumerate(zip(MODES, SIZES, strict=True)):
            v = gray_level(label, index)
            image = PIL.Image.new("L", size, v).convert(mode)
            image.save(root / "train" / name / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def folder_dataset(imagefolder) -> Dataset:
    return load_image_dataset(str(imagefolder), "train")


def test_imagefolder_columns_are_found(folder_dataset):
    assert len(folder_dataset) == 12
    assert find_columns(folder_dataset) == ("image", "label")
    assert folder_dataset.features["label"].names == FOLDER_CLASSES


def test_class_names_are_read_from_the_metadata(imagefolder, fmnist4_folder):
    assert class_names_of(DataConfig(dataset=str(imagefolder))) == FOLDER_CLASSES
    assert class_names_of(DataConfig(dataset=str(fmnist4_folder))) == FMNIST4_CLASSES
    assert class_names_of(DataConfig()) == list(FASHION_MNIST_CLASSES)


@pytest.mark.parametrize("channels", [1, 3])
def test_images_are_converted_resized_and_keep_their_labels(folder_dataset, channels):
    data = load_images(folder_dataset, resolution=8, channels=channels)
    images = data.images[:]  # read from the cache, as a tensor
    assert data.images.shape == images.shape and images.dtype == torch.float32
    assert data.images.shape == (12, channels, 8, 8) and data.images.dtype == torch.float32
    assert data.class_names == FOLDER_CLASSES
    assert sorted(data.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # each output is the flat gray image of its own file (any mode, any size), scaled to [0, 1]
    levels = sorted((images * 255).round().flatten(1).unique(dim=1).flatten().tolist())
    expected = sorted(gray_level(label, index) for label in range(3) for index in range(4))
    assert levels == expected
    for image, label in zip(images, data.labels, strict=True):
        level = (image * 255).round()
        assert level.unique().numel() == 1  # flat after resizing, in every channel
        assert abs(level.flatten()[0].item() - (30 + 80 * label.item())) <= 15  # ... and of its own class


def test_class_filter_and_max_per_class(folder_dataset):
    data = load_images(folder_dataset, resolution=8, channels=1, classes=[0, 2])
    assert sorted(data.labels.tolist()) == [0] * 4 + [2] * 4
    assert data.class_names == FOLDER_CLASSES  # the label space is still the dataset's

    picked = load_images(folder_dataset, resolution=8, channels=1, classes=[2, 1], max_per_class=2, seed=0)
    assert sorted(picked.labels.tolist()) == [1, 1, 2, 2]
    again = load_images(folder_dataset, resolution=8, channels=1, classes=[2, 1], max_per_class=2, seed=0)
    assert torch.equal(picked.images[:], again.images[:])  # seeded
    subsets = {tuple(load_images(folder_dataset, resolution=8, channels=1, max_per_class=2, seed=s).images[:, 0, 0, 0]
                     .mul(255).round().tolist()) for s in range(6)}
    assert len(subsets) > 1  # the subset depends on the seed: it really is a random choice
    everything = load_images(folder_dataset, resolution=8, channels=1, max_per_class=10)
    assert len(everything.labels) == 12  # fewer images than max_per_class: all kept


def test_colour_conversion_is_pils():
    """RGB -> L uses ITU-R 601 luma (PIL): pure red is 76, pure green 150; L -> RGB copies the gray level."""
    features = Features({"image": Image(), "label": ClassLabel(names=["red", "green", "gray"])})
    images = [PIL.Image.new("RGB", (4, 4), (255, 0, 0)), PIL.Image.new("RGB", (4, 4), (0, 255, 0)),
              PIL.Image.new("L", (4, 4), 200)]
    dataset = Dataset.from_dict({"image": images, "label": [0, 1, 2]}, features=features)
    gray = load_images(dataset, resolution=4, channels=1)
    assert (gray.images[:] * 255).round()[:, 0, 0, 0].tolist() == [76, 150, 200]
    rgb = load_images(dataset, resolution=4, channels=3)
    assert (rgb.images[:] * 255).round()[:, :, 0, 0].tolist() == [[255, 0, 0], [0, 255, 0], [200, 200, 200]]


# ----------------------------------------------------------------------------------------------------------
# A Parquet dataset with other column names
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory, fmnist4_splits) -> Dataset:
    """Real Fashion-MNIST images under other names: `picture` (the image), `inverted` (a second image column),
    `target` (the ClassLabel), plus an int and a string column."""
    train = fmnist4_splits["train"]
    pictures = [np.asarray(im) for im in train["image"]]
    features = Features({"id": Value("int64"), "picture": Image(), "inverted": Image(), "note": Value("string"),
                         "target": ClassLabel(names=FMNIST4_CLASSES)})
    dataset = Dataset.from_dict(
        {"id": list(range(len(train))), "picture": pictures, "inverted": [255 - p for p in pictures],
         "note": ["x"] * len(train), "target": list(train["label"])},
        features=features,
    )
    folder = write_parquet_dataset(tmp_path_factory.mktemp("parquet"), {"train": dataset})
    return load_image_dataset(str(folder), "train")


def test_parquet_columns_auto_and_explicit(parquet_dataset, fmnist4_splits):
    assert find_columns(parquet_dataset) == ("picture", "target")
    assert find_columns(parquet_dataset, image_column="inverted") == ("inverted", "target")
    auto = load_images(parquet_dataset, resolution=28, channels=1)
    inverted = load_images(parquet_dataset, resolution=28, channels=1, image_column="inverted", label_column="target")
    assert torch.allclose(auto.images[:] + inverted.images[:], torch.ones(auto.images.shape), atol=1e-6)
    # the pixels are the real Fashion-MNIST ones, unchanged at their own resolution
    raw = np.stack([np.asarray(im) for im in fmnist4_splits["train"]["image"]])
    assert torch.equal((auto.images[:][:, 0] * 255).round().to(torch.uint8), torch.from_numpy(raw))
    assert auto.class_names == FMNIST4_CLASSES
    assert torch.bincount(auto.labels).tolist() == [FMNIST4_TRAIN_PER_CLASS] * 4


def test_resize_to_a_larger_rgb_image(parquet_dataset):
    data = load_images(parquet_dataset, resolution=32, channels=3, classes=[1], max_per_class=3)
    images = data.images[:]
    assert images.shape == (3, 3, 32, 32) and data.labels.tolist() == [1, 1, 1]
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.1


@pytest.mark.parametrize("kwargs, message", [
    ({"image_column": "photo"}, "no image column named 'photo' in the dataset; its columns are"),
    ({"label_column": "klass"}, "no label column named 'klass'"),
    ({"label_column": "id"}, "label column 'id' is a Value, not a ClassLabel"),
    ({"image_column": "note"}, "image column 'note' is a Value, not a Image"),
])
def test_named_columns_that_do_not_fit(parquet_dataset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        find_columns(parquet_dataset, **kwargs)


def test_dataset_without_a_label_column(tmp_path):
    """Integer labels without a ClassLabel feature: the error lists the columns and says how to name one."""
    dataset = Dataset.from_dict({"img": [np.zeros((4, 4), np.uint8)], "y": [3]},
                                features=Features({"img": Image(), "y": Value("int64")}))
    folder = write_parquet_dataset(tmp_path / "nolabel", {"train": dataset})
    loaded = load_image_dataset(str(folder), "train")
    with pytest.raises(ValueError) as error:
        load_images(loaded, resolution=4, channels=1)
    assert "no label column in the dataset" in str(error.value)
    assert "'img': 'Image'" in str(error.value) and "'y': 'Value'" in str(error.value)
    assert "label_column" in str(error.value)


def test_dataset_without_an_image_column():
    dataset = Dataset.from_dict({"pixels": [[0.0, 1.0]], "label": [0]},
                                features=Features({"pixels": datasets.Sequence(Value("float32")),
                                                   "label": ClassLabel(names=["a"])}))
    with pytest.raises(ValueError, match="no image column in the dataset; its columns are .*'pixels'.*image_column"):
        find_columns(dataset)


# ----------------------------------------------------------------------------------------------------------
# builtin:fashion_mnist
# ----------------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file independently of hf_d3: magic (2 zero bytes, dtype, ndim), big-endian dims, then uint8."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = np.frombuffer(raw[4: 4 + 4 * ndim], dtype=">u4")
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


def test_builtin_fashion_mnist_test_split():
    assert hf_d3.data.CACHE_DIR == Path(HF_D3_CACHE)  # the tests never touch the user's cache
    test = load_image_dataset("builtin:fashion_mnist", "test")
    assert len(test) == 10_000
    assert test.features["label"].names == FASHION_MNIST_CLASSES
    assert find_columns(test) == ("image", "label")
    assert (Path(HF_D3_CACHE) / "fashion_mnist" / "test" / "dataset_info.json").is_file()

    raw_images = read_idx(hf_d3.data.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    raw_labels = read_idx(hf_d3.data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert raw_images.shape == (10_000, 28, 28)
    assert np.bincount(raw_labels).tolist() == [1000] * 10
    first = load_images(test.select(range(50)), resolution=28, channels=1)
    assert torch.equal((first.images[:][:, 0] * 255).round().to(torch.uint8), torch.from_numpy(raw_images[:50].copy()))
    assert first.labels.tolist() == raw_labels[:50].tolist()

    cached = load_image_dataset("builtin:fashion_mnist", "test")  # second call: read back from the cache
    assert cached["label"][:100] == test["label"][:100]


def test_builtin_fashion_mnist_bad_input(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="split='validation' is not a Fashion-MNIST split"):
        load_image_dataset("builtin:fashion_mnist", "validation")
    monkeypatch.setattr(hf_d3.data, "FASHION_MNIST_DIR", tmp_path)  # as HF_D3_FASHION_MNIST_DIR=<empty dir>
    monkeypatch.setattr(hf_d3.data, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_image_dataset("builtin:fashion_mnist", "train")
