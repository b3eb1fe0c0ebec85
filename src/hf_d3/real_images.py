"""`RealImages`: the one type real images travel as between modules (a split's images, a subtask's, the test
split's). Its images are a tensor, or `CachedImages` read from the image cache on demand (`hf_d3.cached_images`, the
storage behind it); `hf_d3.data` loads them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from .cached_images import CachedImages, ImageCache


@dataclass
class RealImages:
    """Images [N, C, H, W] in [0, 1] with their labels: label i is the dataset's class `class_ids[i]`, named
    `class_names[i]` (default: the ids as text).

    A split's images (`hf_d3.data.load_images`) index all its classes, so their labels are the dataset's ids; a
    subtask's (`hf_d3.data.load_subtask_images`) index its block of classes, so their labels are local (0..n-1).
    """

    images: torch.Tensor | CachedImages
    labels: torch.Tensor
    class_ids: list[int]
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.class_names = self.class_names or [str(c) for c in self.class_ids]
        if len(self.class_names) != len(self.class_ids):
            raise ValueError(f"class_names={self.class_names} name {len(self.class_names)} classes but class_ids="
                             f"{self.class_ids} has {len(self.class_ids)}; valid: one name per class id")

    @classmethod
    def from_cache(cls, cache: ImageCache, classes: Sequence[int] | None = None, max_per_class: int | None = None,
                   seed: int = 0, limit: int | None = None) -> RealImages:
        """The images of `classes` (default: all) in the dataset's order, at most `max_per_class` of each (a subset
        picked by `seed`), then the first `limit`, read on demand; labels are the dataset's ids."""
        labels = cache.labels
        if classes is None:
            keep = np.arange(len(labels))
        else:
            keep = np.sort(np.concatenate([cache.class_indices(int(c)) for c in classes] or [np.empty(0, np.int64)]))
        if max_per_class is not None:
            # the same draw as before the cache existed (one permutation per class, classes in ascending order),
            # so a seed keeps picking the same images
            rng = np.random.default_rng(seed)
            keep = np.concatenate([rng.permutation(keep[labels[keep] == c])[:max_per_class]
                                   for c in np.unique(labels[keep])])
            keep.sort()
        keep = keep[:limit]
        class_ids = list(range(len(cache.class_names)))
        return cls(CachedImages(cache, keep), torch.from_numpy(labels[keep]).long(), class_ids, list(cache.class_names))

    def subset(self, rows: torch.Tensor) -> RealImages:
        """The images of `rows` (read into a tensor), over the same classes."""
        return RealImages(self.images[rows], self.labels[rows], self.class_ids, self.class_names)

    @cached_property
    def indices_by_class(self) -> list[torch.Tensor]:
        """The indices (on the CPU, ascending) of each class's images, in label order. Found once: the MMD term draws
        from them every iteration, and one pass over the labels per class took 0.73-0.83 s at a subtask of 500
        ImageNet classes (benchmarks/mmd_draw.py)."""
        labels = self.labels.cpu()
        order = torch.argsort(labels, stable=True)
        return list(order.split(torch.bincount(labels, minlength=len(self.class_ids)).tolist()))
