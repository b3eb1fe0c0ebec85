"""The sample grid a run and a pipeline repo show: what a distilled set generates, a named row per class."""

from __future__ import annotations

from typing import TYPE_CHECKING

import PIL.Image
import torch

if TYPE_CHECKING:
    from .pipelines.pipeline_d3 import D3Pipeline


# Rows a grid draws at most: one row per class stays readable to 20 or so (Tiny ImageNet's 200 would be a 16,000 pixel
# high image nobody scrolls through).
GRID_MAX_CLASSES = 20


def grid_classes(class_ids: list[int], max_classes: int = GRID_MAX_CLASSES) -> list[int]:
    """The classes a sample grid shows: every one, or `max_classes` of them spread evenly, the first and the last
    included."""
    if len(class_ids) <= max_classes:
        return list(class_ids)
    return [class_ids[round(i * (len(class_ids) - 1) / max(max_classes - 1, 1))] for i in range(max_classes)]


def sample_grid(pipe: D3Pipeline, per_class: int = 8, max_classes: int = GRID_MAX_CLASSES,
                seed: int = 0) -> PIL.Image.Image:
    """A grid of what the pipeline generates: one row per class, named, its mean images first, then samples if
    the row has room; the rows of at most `max_classes` classes (`grid_classes`). Its title says what a row holds
    and, when some classes are left out, how many are shown of how many. Every image is drawn about 80 pixels
    wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = pipe.latent_store
    all_classes = list(store.config.class_ids)
    class_ids = grid_classes(all_classes, max_classes)
    means = min(store.config.latents_per_class, per_class)
    figure, axes = plt.subplots(len(class_ids), per_class, squeeze=False,
                                figsize=(1.6 + 0.8 * per_class, 0.3 + 0.8 * len(class_ids)), dpi=100,
                                layout="constrained")  # constrained: room for the title above the rows
    for row, class_id in zip(axes, class_ids):
        out = pipe(class_labels=[class_id], include_means=True, output_type="np",
                   num_samples_per_component=-(-(per_class - means) // store.config.latents_per_class),
                   generator=torch.Generator().manual_seed(seed))
        images = [*out.images[:means], *out.images[store.config.latents_per_class:][:per_class - means]]
        for column, (ax, image) in enumerate(zip(row, images)):
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(store.class_names[class_id], rotation=0, ha="right", va="center", fontsize=9)
    gaussians = store.config.latents_per_class
    rows = (f"each row: the mean images of {means} of its {gaussians} Gaussians" if means == per_class
            else f"each row: the mean images of its {means} Gaussian(s), then samples")
    if len(class_ids) < len(all_classes):
        rows = f"{len(class_ids)} of the {len(all_classes)} classes, evenly spaced; {rows}"
    figure.suptitle(rows, fontsize=9)
    figure.canvas.draw()
    grid = PIL.Image.frombuffer("RGBA", figure.canvas.get_width_height(), figure.canvas.buffer_rgba()).convert("RGB")
    plt.close(figure)
    return grid
