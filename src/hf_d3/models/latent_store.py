"""Per-class diagonal Gaussians in a decoder's latent space: the statistics half of a D3 dataset."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..quantization import StoredInDtype, check_storage_dtype

# The class ids of a `label_top_k` store's soft labels (at most 32,767 classes)
LABEL_ID_DTYPE = torch.int16


def folded_ids(class_ids: Sequence[int]) -> str:
    """Class ids as logs and errors show them: a list with each run of three or more consecutive ids folded, so
    the 50 classes of one of Tiny ImageNet's subtasks read `[0-49]`, and `[2, 3]` stays as it is."""
    runs: list[list[int]] = []
    for c in class_ids:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return "[" + ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs) + "]"


def check_label_top_k(label_top_k: int | None, num_classes: int) -> None:
    if label_top_k is not None and not 1 <= label_top_k <= num_classes:
        raise ValueError(f"label_top_k={label_top_k} must be None (whole labels) or 1 to num_classes={num_classes}")


def keep_top_k(soft_labels: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Each row of `soft_labels` with only its `top_k` largest probabilities, renormalised to sum to 1 (None: as it
    is). What a store of `label_top_k` keeps (docs/method.md, Storage)."""
    if top_k is None:
        return soft_labels
    values, ids = soft_labels.topk(top_k, dim=1)
    return torch.zeros_like(soft_labels).scatter_(1, ids, values / values.sum(1, keepdim=True))


def store_sizes(class_ids: Sequence[int], num_classes: int, latents_per_class: int, latent_dim: int,
                class_names: Sequence[str] | None = None, subtask_sizes: Sequence[int] | None = None,
                logvar_dim: int | None = None) -> tuple[list[int], int]:
    """The subtask sizes and log-variances per Gaussian of a `GaussianLatentStore` of these arguments, defaults
    filled in; raises ValueError, naming what would be valid, for arguments no store can have."""
    class_ids = list(class_ids)
    subtask_sizes = list(subtask_sizes or [len(class_ids)])
    if latents_per_class < 1 or latent_dim < 1:
        raise ValueError(
            f"latents_per_class={latents_per_class} and latent_dim={latent_dim} must both be >= 1"
        )
    if not class_ids or min(class_ids) < 0 or max(class_ids) >= num_classes:
        raise ValueError(f"class_ids={folded_ids(class_ids)} must be non-empty ids in [0, {num_classes})")
    if sum(subtask_sizes) != len(class_ids) or min(subtask_sizes) < 1:
        raise ValueError(
            f"subtask_sizes={subtask_sizes} must be positive and sum to the {len(class_ids)} classes"
        )
    logvar_dim = latent_dim if logvar_dim is None else logvar_dim
    if not 1 <= logvar_dim <= latent_dim or latent_dim % logvar_dim:
        raise ValueError(f"logvar_dim={logvar_dim} must divide latent_dim={latent_dim} (1 to {latent_dim})")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} names, expected num_classes={num_classes}")
    return subtask_sizes, logvar_dim


class GaussianLatentStore(StoredInDtype, ModelMixin, ConfigMixin):
    """`latents_per_class` diagonal Gaussians per class, with one soft label per component.

    Components are ordered by class (in `class_ids` order), then by index within the class. The classes
    are split into contiguous subtasks of `subtask_sizes` classes; each subtask has its own generator in
    the decoder, and `component_subtask` says which one decodes a component.

    Args:
        class_ids: global ids of the classes this store covers, in order.
        num_classes: size of the global label space (the length of a soft label).
        latents_per_class: Gaussians per class ("M" in the paper).
        latent_dim: dimension of each Gaussian.
        class_names: names of all `num_classes` classes; defaults to their ids as strings.
        subtask_sizes: classes per subtask, summing to `len(class_ids)`; defaults to one subtask.
        logvar_dim: log-variances per Gaussian, each shared by `latent_dim // logvar_dim` consecutive latent
            dimensions; defaults to `latent_dim` (a free variance per dimension, the paper's). A spatial latent
            C x H x W with `logvar_dim=C` has one variance per channel, which halves a Gaussian's storage: a
            warm start from one real image per Gaussian sets every variance to the same value anyway.
        storage_dtype: how `save_pretrained` stores the floating tensors (`hf_d3.quantization`): "float32" (as
            held), "float16", "bfloat16" or "int8" (a scale per Gaussian and per soft label).
        label_top_k: keep only the k largest probabilities of each soft label (`set_soft_labels`), stored as k
            values and k int16 class ids instead of `num_classes` values; default None, the whole label. At many
            classes the labels are most of the storage (docs/method.md, Storage).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        class_ids: Sequence[int],
        num_classes: int,
        latents_per_class: int = 1,
        latent_dim: int = 64,
        class_names: Sequence[str] | None = None,
        subtask_sizes: Sequence[int] | None = None,
        logvar_dim: int | None = None,
        storage_dtype: str = "float32",
        label_top_k: int | None = None,
    ):
        super().__init__()
        check_storage_dtype(storage_dtype)
        check_label_top_k(label_top_k, num_classes)
        class_ids = list(class_ids)
        subtask_sizes, logvar_dim = store_sizes(class_ids, num_classes, latents_per_class, latent_dim, class_names,
                                                subtask_sizes, logvar_dim)
        num_components = len(class_ids) * latents_per_class
        self.mean = nn.Parameter(torch.randn(num_components, latent_dim))
        self.logvar = nn.Parameter(torch.randn(num_components, logvar_dim))
        subtask_of_class = torch.repeat_interleave(
            torch.arange(len(subtask_sizes)), torch.tensor(subtask_sizes)
        )
        component_class = torch.tensor(class_ids).repeat_interleave(latents_per_class)
        self.register_buffer("component_class", component_class)
        self.register_buffer("component_subtask", subtask_of_class.repeat_interleave(latents_per_class))
        self.register_buffer(
            "soft_labels", nn.functional.one_hot(component_class, num_classes).float()
        )

    @property
    def num_components(self) -> int:
        return self.mean.shape[0]

    @property
    def class_names(self) -> list[str]:
        names = self.config.class_names
        return list(names) if names is not None else [str(i) for i in range(self.config.num_classes)]

    @torch.no_grad()
    def set_soft_labels(self, soft_labels: torch.Tensor) -> None:
        """Give every component its soft label [num_components, num_classes], keeping the `label_top_k` largest
        probabilities of each (renormalised) when the store has one: what is held is what is saved."""
        self.soft_labels.copy_(keep_top_k(soft_labels, self.config.label_top_k))

    def _compact(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # label_top_k: a soft label is saved as its k kept probabilities and their class ids
        if (top_k := self.config.label_top_k) is None:
            return state_dict
        compact = {name: tensor for name, tensor in state_dict.items() if name != "soft_labels"}
        values, ids = state_dict["soft_labels"].topk(top_k, dim=1)
        return {**compact, "soft_label_values": values, "soft_label_ids": ids.to(LABEL_ID_DTYPE)}

    def _expand(self, state_dict: dict[str, torch.Tensor]) -> None:
        if "soft_label_ids" in state_dict:
            ids, values = state_dict.pop("soft_label_ids").long(), state_dict.pop("soft_label_values")
            dense = torch.zeros(ids.shape[0], self.config.num_classes, dtype=values.dtype)
            state_dict["soft_labels"] = dense.scatter_(1, ids, values)

    def std(self, components: torch.Tensor | None = None) -> torch.Tensor:
        """Standard deviation of every latent dimension of `components` (default all), [n, latent_dim]."""
        logvar = self.logvar if components is None else self.logvar[components]
        return torch.exp(logvar / 2).repeat_interleave(self.mean.shape[1] // logvar.shape[1], dim=1)

    @torch.no_grad()
    def fit_to(self, latents: torch.Tensor, min_variance: float = 0.01) -> None:
        """Make every component the Gaussian of its latents [num_components, n, latent_dim]: their mean and
        their variance, at least `min_variance` (all of it when n = 1); a log-variance shared by several
        dimensions gets their mean variance."""
        variance = latents.var(1, unbiased=False)  # 0 for a single latent
        self.mean.copy_(latents.mean(1))
        self.logvar.copy_(variance.view(self.num_components, self.logvar.shape[1], -1).mean(2)
                          .clamp_min(min_variance).log())

    def components_of(self, class_labels: Sequence[int] | None = None) -> torch.Tensor:
        """Indices of the components of `class_labels` (global ids), or of every component."""
        if class_labels is None:
            return torch.arange(self.num_components, device=self.mean.device)
        unknown = sorted(set(int(c) for c in class_labels) - set(self.config.class_ids))
        if unknown:
            raise ValueError(f"class_labels {folded_ids(unknown)} are not in this store; valid: "
                             f"{folded_ids(self.config.class_ids)}")
        wanted = torch.as_tensor(list(class_labels), device=self.component_class.device)
        return torch.nonzero(torch.isin(self.component_class, wanted)).flatten()

    def sample(
        self,
        components: torch.Tensor | None = None,
        num_samples_per_component: int = 1,
        include_means: bool = False,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `mean + exp(logvar / 2) * eps` for each component.

        Returns the latents and, for each, the index of its component. With `include_means`, every
        component's mean comes first, then the samples. `noise` gives the standard normal draws `eps` (shape of
        the samples) instead of drawing them from `generator`: a caller can draw many on the host at once and
        move them to the device in one copy.
        """
        if components is None:
            components = self.components_of()
        index = components.repeat(num_samples_per_component)
        mean = self.mean[index]
        if noise is None:
            # Draw on the generator's device so a CPU generator gives the same samples on any device.
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device)
        eps = noise.to(mean)
        latents = mean + self.std(index) * eps
        if include_means:
            latents = torch.cat([self.mean[components], latents])
            index = torch.cat([components, index])
        return latents, index
