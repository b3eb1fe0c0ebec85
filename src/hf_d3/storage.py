"""The storage axis of the metric: what it costs to keep enough to regenerate the training data (docs/method.md,
Storage).

Counted from the sizes alone, never from built modules, so the run's planner and the budget solver
(`hf_d3.sizing`) count sizes they never build (1,000 classes at 64x64 allocate nothing) exactly as the pipeline
counts what it holds: every tensor its safetensors files store (tests/unit/test_storage.py checks the count against
built modules).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from .models.decoder import start_side
from .models.latent_store import LABEL_ID_DTYPE, store_sizes
from .quantization import stored_bytes

# The components' class and subtask ids and BatchNorm's batch counts are int64, whatever the modules' dtype.
INTEGER_BYTES = 8
# A `label_top_k` soft label's class ids are int16 (`hf_d3.models.latent_store.LABEL_ID_DTYPE`)
LABEL_ID_BYTES = LABEL_ID_DTYPE.itemsize


@dataclass
class StorageReport:
    """Stored values and bytes (at the dtype each part is stored in) by part, and two images-per-class equivalents.

    `label_values` are the soft labels (with `label_top_k`, k probabilities and k class ids each) plus each
    component's class id and subtask id. `ipc_equivalent` = stored
    values / (classes x values in one image), the paper's convention; `ipc_equivalent_bytes` = stored bytes /
    (classes x bytes of one uint8 image), what the same storage holds of real images as datasets store them.
    """

    latent_values: int
    decoder_values: int
    label_values: int
    total_values: int
    total_bytes: int
    values_per_image: int
    num_classes: int
    ipc_equivalent: float
    latent_bytes: int
    decoder_bytes: int
    label_bytes: int
    ipc_equivalent_bytes: float

    @property
    def decoder_share(self) -> float:
        return self.decoder_values / self.total_values

    def to_dict(self) -> dict:
        return asdict(self)


def soft_label_values(num_classes: int, label_top_k: int | None = None) -> int:
    """The stored values of one soft label: `num_classes` probabilities, or with `label_top_k` the k kept
    probabilities and their k class ids."""
    return num_classes if label_top_k is None else 2 * label_top_k


def soft_label_bytes(count: int, num_classes: int, storage_dtype: str = "float32", held_itemsize: int = 4,
                     label_top_k: int | None = None) -> int:
    """The bytes of `count` soft labels (`soft_label_values`) in `storage_dtype` (int8: a scale per label), held in
    floats of `held_itemsize` bytes; a `label_top_k` label's class ids are int16."""
    if label_top_k is None:
        return stored_bytes([count, num_classes], storage_dtype, held_itemsize)
    return stored_bytes([count, label_top_k], storage_dtype, held_itemsize) + count * label_top_k * LABEL_ID_BYTES


def component_values(latent_dim: int, logvar_dim: int, num_classes: int, label_top_k: int | None = None
                     ) -> tuple[int, int, int]:
    """What one Gaussian component stores: its mean and log-variances, its soft label (`soft_label_values`), and
    its integer class id and subtask id."""
    return latent_dim + logvar_dim, soft_label_values(num_classes, label_top_k), 2


def component_bytes(latent_dim: int, logvar_dim: int, num_classes: int, storage_dtype: str = "float32",
                    held_itemsize: int = 4, label_top_k: int | None = None) -> tuple[int, int, int]:
    """The bytes of what one Gaussian component stores (`component_values`) in `storage_dtype`, held in floats of
    `held_itemsize` bytes: its mean and log-variances, its soft label, its two integer ids."""
    latents = sum(stored_bytes([1, n], storage_dtype, held_itemsize) for n in (latent_dim, logvar_dim))
    return latents, soft_label_bytes(1, num_classes, storage_dtype, held_itemsize, label_top_k), 2 * INTEGER_BYTES


def generator_tensors(decoder: Mapping) -> tuple[list[tuple[tuple[int, ...], int]], int]:
    """The floating tensors of one generator of a `D3Decoder` of these arguments (or its `.config`), each as
    (shape, the channel axis of its int8 scales), and its integer values.

    A generator holds a Linear projection of the latent to the first feature map (with `latent_projection`); per
    upsampling stage a convolution (a transposed one of `upsample_kernel_size`, or a 3x3 one after a resize) with
    its bias, then a BatchNorm: affine weight and bias, running mean and variance, and an integer batch count; last,
    a 3x3 convolution to the image."""
    latent_dim, out_channels, channels = decoder["latent_dim"], decoder["out_channels"], list(decoder["channels"])
    side = start_side(latent_dim, decoder["resolution"], out_channels, channels, decoder["latent_projection"],
                      decoder["upsample_kernel_size"], decoder["upsample_mode"])
    feature_values = channels[0] * side**2
    tensors = [((feature_values, latent_dim), 0), ((feature_values,), 0)] if decoder["latent_projection"] else []
    kernel = decoder["upsample_kernel_size"]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        if decoder["upsample_mode"] == "transpose":  # a transposed convolution's weight is [in, out, k, k]
            tensors.append(((c_in, c_out, kernel, kernel), 1))
        else:
            tensors.append(((c_out, c_in, 3, 3), 0))
        tensors += [((c_out,), 0)] * 5  # the convolution's bias, then the BatchNorm's four vectors
    tensors += [((out_channels, channels[-1], 3, 3), 0), ((out_channels,), 0)]
    return tensors, len(channels) - 1


def decoder_values(decoder: Mapping) -> tuple[int, int]:
    """The floating-point and the integer values of a `D3Decoder` of these arguments (or its `.config`): its
    `num_subtasks` generators (`generator_tensors`)."""
    tensors, integers = generator_tensors(decoder)
    return decoder["num_subtasks"] * sum(math.prod(shape) for shape, _ in tensors), decoder["num_subtasks"] * integers


def decoder_bytes(decoder: Mapping, storage_dtype: str = "float32", held_itemsize: int = 4) -> int:
    """The bytes of a `D3Decoder` of these arguments in `storage_dtype`, held in floats of `held_itemsize` bytes."""
    tensors, integers = generator_tensors(decoder)
    floats = sum(stored_bytes(shape, storage_dtype, held_itemsize, axis) for shape, axis in tensors)
    return decoder["num_subtasks"] * (floats + integers * INTEGER_BYTES)


def storage_report(latent_store: Mapping, decoder: Mapping, latent_store_dtype: torch.dtype = torch.float32,
                   decoder_dtype: torch.dtype = torch.float32) -> StorageReport:
    """The storage of a `GaussianLatentStore` and a `D3Decoder` of these configs (their `.config`, or the
    arguments they are built with), their floating-point tensors held in these dtypes and stored in each config's
    `storage_dtype` (default float32: as held; `hf_d3.quantization`): every Gaussian's mean and log-variances, its
    soft label, class id and subtask id, and every decoder parameter and buffer. Values count what the modules
    hold (a `label_top_k` store's labels as saved: k probabilities and k class ids); bytes count the files, int8
    scales included."""
    class_ids, num_classes = latent_store["class_ids"], latent_store["num_classes"]
    latent_dim = latent_store["latent_dim"]
    _, logvar_dim = store_sizes(class_ids, num_classes, latent_store["latents_per_class"], latent_dim,
                                latent_store.get("class_names"), latent_store.get("subtask_sizes"),
                                latent_store.get("logvar_dim"))
    components = len(class_ids) * latent_store["latents_per_class"]
    top_k = latent_store.get("label_top_k")
    latents, soft_labels, ids = (components * n for n in component_values(latent_dim, logvar_dim, num_classes,
                                                                            top_k))
    latent_bytes, soft_label_bytes, id_bytes = (components * n for n in component_bytes(
        latent_dim, logvar_dim, num_classes, latent_store.get("storage_dtype", "float32"),
        latent_store_dtype.itemsize, top_k))
    floats, integers = decoder_values(decoder)
    values_per_image = decoder["out_channels"] * decoder["resolution"] ** 2  # a uint8 image's bytes too
    parts = {"latent": (latents, latent_bytes),
             "decoder": (floats + integers, decoder_bytes(decoder, decoder.get("storage_dtype", "float32"),
                                                          decoder_dtype.itemsize)),
             "label": (soft_labels + ids, soft_label_bytes + id_bytes)}
    total_values, total_bytes = (sum(part[i] for part in parts.values()) for i in (0, 1))
    return StorageReport(
        **{f"{name}_values": values for name, (values, _) in parts.items()},
        **{f"{name}_bytes": size for name, (_, size) in parts.items()},
        total_values=total_values,
        total_bytes=total_bytes,
        values_per_image=values_per_image,
        num_classes=len(class_ids),
        ipc_equivalent=total_values / (len(class_ids) * values_per_image),
        ipc_equivalent_bytes=total_bytes / (len(class_ids) * values_per_image),
    )


def prototype_storage(num_classes: int, images_per_class: int, values_per_image: int, soft_labels: bool,
                      label_top_k: int | None = None) -> int:
    """Stored values of a prototype-image dataset: its images, plus a soft label (whole, or its `label_top_k`
    largest probabilities: `soft_label_values`) or a class id per image."""
    per_label = soft_label_values(num_classes, label_top_k) if soft_labels else 1
    return num_classes * images_per_class * (values_per_image + per_label)


def largest_ipc_within(budget_values: int, num_classes: int, values_per_image: int, soft_labels: bool) -> int:
    """The most real images per class whose images and labels fit in `budget_values` stored values."""
    return budget_values // prototype_storage(num_classes, 1, values_per_image, soft_labels)


def real_image_bytes(num_classes: int, images_per_class: int, values_per_image: int,
                     soft_label_dtype: str | None, label_top_k: int | None = None) -> int:
    """Bytes of an image set as image datasets are published: uint8 pixels, and per image a class id (int64, as
    D3's) or, with `soft_label_dtype`, a soft label stored as D3 stores its soft labels in that `storage_dtype` (and
    `label_top_k`)."""
    images = num_classes * images_per_class
    labels = (images * INTEGER_BYTES if soft_label_dtype is None
              else soft_label_bytes(images, num_classes, soft_label_dtype, label_top_k=label_top_k))
    return images * values_per_image + labels
