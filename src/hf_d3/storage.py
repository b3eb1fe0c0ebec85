"""The storage axis of the metric: what it costs to keep enough to regenerate the training data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass
class StorageReport:
    """Stored values by part, bytes at the stored dtype, and the images-per-class equivalent.

    `ipc_equivalent` = stored values / (classes x values in one image).
    """

    latent_values: int
    decoder_values: int
    label_values: int
    total_values: int
    total_bytes: int
    values_per_image: int
    num_classes: int
    ipc_equivalent: float

    def to_dict(self) -> dict:
        return asdict(self)


def _count(tensors) -> tuple[int, int]:
    tensors = list(tensors)
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def storage_report(latent_store: nn.Module, decoder: nn.Module) -> StorageReport:
    """Count every stored tensor: means and log-variances, every decoder parameter and buffer, and the
    latent store's buffers (soft labels, class ids and subtask ids of the components)."""
    latent_values, latent_bytes = _count(latent_store.parameters())
    decoder_values, decoder_bytes = _count(list(decoder.parameters()) + list(decoder.buffers()))
    label_values, label_bytes = _count(latent_store.buffers())
    values_per_image = decoder.config.out_channels * decoder.config.resolution**2
    num_classes = len(latent_store.config.class_ids)
    total = latent_values + decoder_values + label_values
    return StorageReport(
        latent_values=latent_values,
        decoder_values=decoder_values,
        label_values=label_values,
        total_values=total,
        total_bytes=latent_bytes + decoder_bytes + label_bytes,
        values_per_image=values_per_image,
        num_classes=num_classes,
        ipc_equivalent=total / (num_classes * values_per_image),
    )


def prototype_storage(num_classes: int, images_per_class: int, values_per_image: int, soft_labels: bool) -> int:
    """Stored values of a prototype-image dataset: its images, plus a soft label or a class id per image."""
    per_label = num_classes if soft_labels else 1
    return num_classes * images_per_class * (values_per_image + per_label)
