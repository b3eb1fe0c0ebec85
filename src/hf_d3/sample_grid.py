"""The sample grid a run and a pipeline repo show: what a distilled set generates, a named row per class."""

from __future__ import annotations

from typing import TYPE_CHECKING

import PIL.Image
import torch

if TYPE_CHECKING:
    from .pipelines.pipeline_d3 import D3Pipeline


def sample_grid(pipe: D3Pipeline, per_class: int = 8, max_classes: int = 20, seed: int = 0) -> PIL.Image.Image:
    """A grid of what the pipeline generates: one row per class, named, its mean images first, then samples if
    the row has room (its title says which); at
    most `max_classes` rows, spread evenly over the classes. Every image is drawn about 80 pixels wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = pipe.latent_store
    class_ids = list(store.config.class_ids)
    class_ids = [class_ids[round(i * (len(class_ids) - 1) / max(max_classes - 1, 1))]
                 for i in range(max_classes)] if len(class_ids) > max_classes else class_ids
    means = min(store.config.latents_per_class, per_class)
    figure, axes = plt.subplots(len(class_ids), per_class, squeeze=False,
                                figsize=(1.6 + 0.8 * per_class, 0.3 + 0.8 * len(class_ids)), dpi=100)
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
    figure.suptitle(f"each row: the mean images of {means} of its {gaussians} Gaussians" if means == per_class
                    else f"each row: the mean images of its {means} Gaussian(s), then samples", fontsize=9)
    figure.tight_layout()
    figure.canvas.draw()
    grid = PIL.Image.frombuffer("RGBA", figure.canvas.get_width_height(), figure.canvas.buffer_rgba()).convert("RGB")
    plt.close(figure)
    return grid
