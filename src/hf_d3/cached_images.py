"""The image cache, reading side: a split's images decoded once to uint8 on disk (`ImageCache`), and the images of
a selection read on demand like a float tensor (`CachedImages`): the storage behind `hf_d3.real_images.RealImages`.
Built by `hf_d3.cache_builder`, found or built by `hf_d3.data.image_cache`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import PIL.Image

# Bumped when the cache's files or their meaning change: an older cache is then built again, never misread.
CACHE_FORMAT = 1


def decode_image(image: PIL.Image.Image, resolution: int, channels: int) -> np.ndarray:
    """One PIL image as uint8 [resolution, resolution, channels]: PIL's conversion to L or RGB, then a bicubic resize
    if its size differs."""
    image = image.convert({1: "L", 3: "RGB"}[channels])
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), resample=3)  # bicubic
    return np.asarray(image).reshape(resolution, resolution, channels)


def to_float(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [0, 1] on `device` (the one conversion every reader uses).

    Moved while still uint8 and converted there: a quarter of the bytes to copy, and no conversion on the host
    (0.14 s for the 6,000 real images an ipc2 MMD step reads: benchmarks/mmd_draw.py)."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)


class ImageCache:
    """The decoded images of one split at one resolution and channel count, on disk (see `hf_d3.data`).

    `labels` [N] (int64, in memory: 8 bytes an image) are the dataset's class ids in the dataset's order;
    `class_indices(c)` gives the rows of class c in ascending order; `batch(rows)` reads those rows as a float
    tensor. Nothing else is held in memory: images are read with `os.preadv`, not memory-mapped, so the pages read
    count as the kernel's page cache rather than as this process's resident memory.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_file = self.folder / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.folder} is not a finished image cache (no meta.json); delete it to "
                                    "build it again")
        self.meta = json.loads(meta_file.read_text())
        self.resolution, self.channels = self.meta["resolution"], self.meta["channels"]
        self.class_names: list[str] = self.meta["class_names"]
        self.labels = np.load(self.folder / "labels.npy")
        self.class_offsets = np.load(self.folder / "class_offsets.npy")
        self.class_rows = np.load(self.folder / "class_rows.npy")
        images = np.load(self.folder / "images.npy", mmap_mode="r")  # only to read the header: shape and offset
        if images.shape != (len(self.labels), self.resolution, self.resolution, self.channels):
            raise ValueError(f"{self.folder}: images.npy has shape {images.shape}, not {len(self.labels)} images of "
                             f"{self.resolution}x{self.resolution}x{self.channels}; delete the folder to rebuild it")
        self._offset, self._row_bytes = images.offset, self.resolution * self.resolution * self.channels
        del images

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of one image as `batch` returns it."""
        return self.channels, self.resolution, self.resolution

    def class_indices(self, class_id: int) -> np.ndarray:
        """The rows of class `class_id`, ascending."""
        if not 0 <= class_id < len(self.class_names):
            raise ValueError(f"class_id={class_id} is not a class of this cache; valid: 0 to "
                             f"{len(self.class_names) - 1}")
        return self.class_rows[self.class_offsets[class_id]:self.class_offsets[class_id + 1]]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [len(rows), H, W, C] of the given rows (any order, repeats allowed); runs of consecutive rows are
        read with one system call."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            bad = rows[(rows < 0) | (rows >= len(self))][0]
            raise IndexError(f"row {bad} is outside the image cache {self.folder}; valid: 0 to {len(self) - 1}")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        out = np.empty((len(rows), self.resolution, self.resolution, self.channels), dtype=np.uint8)
        starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)  # where a run of consecutive rows begins
        ends = np.append(starts[1:], len(ordered))
        with open(self.folder / "images.npy", "rb", buffering=0) as file:
            buffer = np.empty_like(out)
            for start, end in zip(starts, ends):
                view = memoryview(buffer[start:end]).cast("B")
                offset = self._offset + int(ordered[start]) * self._row_bytes
                while view.nbytes:  # Linux reads at most 2 GiB per call
                    got = os.preadv(file.fileno(), [view], offset)
                    if got == 0:
                        raise OSError(f"{self.folder / 'images.npy'} is shorter than its header says; delete the "
                                      "folder to rebuild the cache")
                    view, offset = view[got:], offset + got
        out[order] = buffer
        return out

    def batch(self, rows: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """The images of `rows` as float32 [len(rows), C, H, W] in [0, 1] on `device`."""
        return to_float(self.read(rows), device)


class CachedImages:
    """Some rows of an `ImageCache`, indexed like the float tensor [N, C, H, W] they stand for: `images[i]`,
    `images[a:b]`, `images[index_tensor]`, `images[bool_mask]` (and `images[rows, ...]`) read just those images and
    return a tensor on `device` (`images[:]` reads all of them); `len`, `shape` and `to(device)` work as for a
    tensor."""

    dtype = torch.float32

    def __init__(self, cache: ImageCache, rows: np.ndarray, device: torch.device | str = "cpu"):
        self.cache, self.rows, self.device = cache, np.asarray(rows, dtype=np.int64), torch.device(device)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.cache.image_shape))

    def to(self, device: torch.device | str) -> CachedImages:
        return CachedImages(self.cache, self.rows, device)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, tuple):  # images[rows, channel, ...]: read the rows, then index the tensor
            first, rest = index[0], index[1:]
            images = self[first]
            return images[rest] if isinstance(first, int | np.integer) else images[(slice(None), *rest)]
        if isinstance(index, int | np.integer):
            return self[[int(index)]][0]
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu()
            index = index.nonzero().flatten() if index.dtype == torch.bool else index
            index = index.numpy()
        elif not isinstance(index, slice):  # a list or array of rows, or a boolean mask (a list of bools too)
            index = np.asarray(index)
            index = np.flatnonzero(index) if index.dtype == bool else index.astype(np.int64)
        return self.cache.batch(self.rows[index], self.device)

    def __repr__(self) -> str:
        return f"CachedImages({len(self)} images of {self.cache.folder}, device={self.device})"
