"""D3Pipeline: a distilled dataset as a diffusers pipeline (latent store + decoder)."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore
from ..storage import StorageReport, storage_report

if TYPE_CHECKING:
    import datasets
    from huggingface_hub import CommitInfo

# Images decoded per decoder call: a slice's activations stay in the CPU's cache, where one call on a whole
# evaluation epoch ran over twice as slow (benchmarks/results/decode_slices.json); in eval mode the images are the
# same either way.
DECODE_SLICE_SIZE = 64


@dataclass
class D3PipelineOutput(BaseOutput):
    """Images drawn from the distilled dataset with their labels.

    Args:
        images: PIL images, a NHWC numpy array or a NCHW tensor, pixels in [0, 1] for the array types.
        labels: global class id of each image.
        soft_labels: [N, num_classes] probabilities of each image's component.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    labels: torch.Tensor
    soft_labels: torch.Tensor


class D3Pipeline(DiffusionPipeline):
    """Generates the training set of a D3 distilled dataset.

    Every component (a diagonal Gaussian of a class in `latent_store`) is decoded by its subtask's
    generator in `decoder`: its mean gives the component's mean image, samples give fresh images.
    """

    model_cpu_offload_seq = "latent_store->decoder"

    def __init__(self, latent_store: GaussianLatentStore, decoder: D3Decoder):
        super().__init__()
        store, generator = latent_store.config, decoder.config
        subtasks = len(store.subtask_sizes) if store.subtask_sizes else 1
        if (subtasks, store.latent_dim) != (generator.num_subtasks, generator.latent_dim):
            raise ValueError(
                f"the latent store and the decoder disagree: the store has {subtasks} subtask(s) of latent_dim="
                f"{store.latent_dim}, the decoder {generator.num_subtasks} generator(s) of latent_dim="
                f"{generator.latent_dim}; they must come from the same distillation"
            )
        self.register_modules(latent_store=latent_store, decoder=decoder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> D3Pipeline:
        """Load from a local folder or a Hub repo id (the snapshot is downloaded, then loaded as a folder).

        Hub keyword arguments (`revision`, `cache_dir`, `token`, `local_files_only`) are honoured; the rest
        (`torch_dtype`: float32 or float64, ...) go to the components' `from_pretrained`. The components are loaded
        with hf_d3's own classes, so a published repo, which also carries their code for users without hf_d3, runs
        none of it.
        """
        if kwargs.get("torch_dtype") not in (None, torch.float32, torch.float64):
            raise ValueError(f"torch_dtype={kwargs['torch_dtype']}: the decoder always runs in float32 "
                             "(D3Decoder.forward), so its weights must be float32 or float64; leave torch_dtype unset")
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            path = _download_snapshot(str(pretrained_model_name_or_path), kwargs)
        for name in ("model_index.json", "latent_store/config.json", "decoder/config.json"):
            if not (path / name).is_file():
                raise OSError(f"{path} is not a D3Pipeline folder: {name} is missing")
        class_name = json.loads((path / "model_index.json").read_text()).get("_class_name")
        if (class_name[-1] if isinstance(class_name, list) else class_name) != cls.__name__:
            raise OSError(f"{path} holds a {class_name!r} pipeline, not a {cls.__name__} (see its model_index.json)")
        load = {"use_safetensors": True, **_load_kwargs(kwargs)}
        try:
            pipe = cls(latent_store=GaussianLatentStore.from_pretrained(path / "latent_store", **load),
                       decoder=D3Decoder.from_pretrained(path / "decoder", **load))
        except Exception as error:  # a truncated or corrupt safetensors file, a bad config
            raise OSError(f"could not load a D3Pipeline from {path}: {error}") from error
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    def push_to_hub(self, repo_id: str, **kwargs) -> CommitInfo:
        """Publish this pipeline with its D3 model card and a sample grid in one commit: the same as
        `hf_d3.hub.push_pipeline_to_hub(self, repo_id, **kwargs)`, whose arguments it takes (`metrics`, `settings`,
        `samples_png`, `token`, `private`, `revision`, `commit_message`, ...). Returns the `CommitInfo`."""
        from ..hub import push_pipeline_to_hub

        return push_pipeline_to_hub(self, repo_id, **kwargs)

    def storage_report(self) -> StorageReport:
        """Values and bytes needed to regenerate the training data (bytes in the components' `storage_dtype`), and
        the IPC equivalents."""
        return storage_report(self.latent_store.config, self.decoder.config, self.latent_store.dtype,
                              self.decoder.dtype)

    def set_storage_dtype(self, storage_dtype: str) -> None:
        """Save the latent store and decoder in `storage_dtype` ("float32", "float16", "bfloat16" or "int8",
        `hf_d3.quantization`) from now on; the pipeline then draws what a load of its saved folder draws."""
        self.latent_store.set_storage_dtype(storage_dtype)
        self.decoder.set_storage_dtype(storage_dtype)

    def to_dataset(self, num_samples_per_component: int = 1, include_means: bool = True, seed: int = 0
                   ) -> datasets.Dataset:
        """The distilled training set as a `datasets.Dataset`.

        Args:
            num_samples_per_component: fresh samples drawn from every Gaussian component.
            include_means: also include every component's mean image (first).
            seed: seed of the `torch.Generator` the samples are drawn with; the same seed gives the same dataset.

        Returns:
            A dataset with columns `image` (PIL images), `label` (a `ClassLabel` named by the latent store's
            `class_names`) and `soft_label` (the component's soft label, float32): `dataset_features`.
        """
        output = self(num_samples_per_component=num_samples_per_component, include_means=include_means,
                      generator=torch.Generator().manual_seed(seed), output_type="pil")
        import datasets  # here, not at the top: loading and drawing (remote code too) need no `datasets`

        return datasets.Dataset.from_dict(
            {
                "image": list(output.images),
                "label": output.labels.cpu().tolist(),
                "soft_label": output.soft_labels.float().cpu().tolist(),
            },
            features=dataset_features(self.latent_store.class_names),
        )

    def to_iterable_dataset(self, seed: int = 0, include_means: bool = True, num_shards: int = 1024
                            ) -> datasets.IterableDataset:
        """The distilled training set as an endless `datasets.IterableDataset` of fresh samples.

        The dataset has `num_shards` shards, each an endless stream of passes over every component: a pass is
        every component's mean image (with `include_means`, as the evaluation protocol has every epoch) and one
        fresh sample of each, in a new random order, drawn from a generator seeded by (`seed`, shard, pass).
        `datasets` reads a reader's shards one after the other, so a reader, which never reaches the end of its
        first shard, reads that shard alone. DataLoader workers and ranks (`datasets.distributed.
        split_dataset_by_node`, which deals out whole shards when `num_shards` is a multiple of the world size)
        each get other shards, so no sample is drawn twice, and what a shard yields does not depend on who reads
        it. The default, 1024, is a multiple of every power-of-two world size and leaves shards for the workers.

        Returns:
            A dataset with the columns of `to_dataset`: `image`, `label` and `soft_label` (`dataset_features`).
        """
        if num_shards < 1:
            raise ValueError(f"num_shards={num_shards} must be >= 1")
        import datasets

        return datasets.IterableDataset.from_generator(
            _endless_passes,
            features=dataset_features(self.latent_store.class_names),
            gen_kwargs={"pipe": self, "shards": list(range(num_shards)), "seed": seed, "include_means": include_means},
        )

    def decode(self, latents: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [0, 1] of `latents` drawn from `components` (indices into the latent store),
        each decoded by its subtask's generator, in slices of `DECODE_SLICE_SIZE`."""
        # A stored dataset must not depend on how images are batched: decode with running statistics.
        self.decoder.eval()
        subtasks = self.latent_store.component_subtask[components]
        with torch.no_grad():
            return torch.cat([self.decoder(z.to(self.decoder.dtype), k).clamp(0, 1) for z, k in
                              zip(latents.split(DECODE_SLICE_SIZE), subtasks.split(DECODE_SLICE_SIZE))])

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | int | None = None,
        num_samples_per_component: int = 1,
        include_means: bool = False,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> D3PipelineOutput | tuple:
        """Draw images from the distilled dataset.

        Args:
            class_labels: global class ids to draw from (default: every class).
            num_samples_per_component: fresh samples drawn from each component.
            include_means: also return every component's mean image (first).
            generator: a `torch.Generator` for reproducible samples.
            output_type: "pil", "np" (NHWC in [0, 1]) or "pt" (NCHW in [0, 1], on the pipeline's device).
            return_dict: return a `D3PipelineOutput` rather than a tuple.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r} is not supported; use 'pil', 'np' or 'pt'")
        if num_samples_per_component < 0 or (num_samples_per_component == 0 and not include_means):
            raise ValueError(
                f"num_samples_per_component={num_samples_per_component} with include_means={include_means} "
                "draws no image; use num_samples_per_component >= 1 or include_means=True"
            )
        if class_labels is not None and np.ndim(class_labels) == 0:  # one id: an int, a NumPy or 0-d torch integer
            class_labels = [int(class_labels)]

        store = self.latent_store
        components = store.components_of(class_labels)
        latents, index = store.sample(components, num_samples_per_component, include_means, generator)
        images = self.decode(latents, index)
        labels, soft_labels = store.component_class[index], store.soft_labels[index]

        images = images.float()
        if output_type != "pt":  # "pt" stays on the pipeline's device, with the labels
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return images, labels, soft_labels
        return D3PipelineOutput(images=images, labels=labels, soft_labels=soft_labels)


def dataset_features(class_names: list[str]) -> datasets.Features:
    """The columns of a materialised D3 dataset: `image`, `label` (ClassLabel) and `soft_label` (float32 list)."""
    import datasets

    float_list = getattr(datasets, "List", None) or datasets.Sequence  # `List` is datasets >= 4; we allow 3
    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(class_names)),
            "soft_label": float_list(datasets.Value("float32")),
        }
    )


def _endless_passes(pipe: D3Pipeline, shards: list[int], seed: int, include_means: bool) -> Iterator[dict]:
    """The examples of `shards` (`D3Pipeline.to_iterable_dataset`; `datasets` passes one shard at a time)."""
    store = pipe.latent_store
    for shard in shards:
        for epoch in itertools.count():
            entropy = np.random.SeedSequence([seed, shard, epoch]).generate_state(2, dtype=np.uint32)
            generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
            with torch.no_grad():
                latents, index = store.sample(None, 1, include_means, generator)
            order = torch.randperm(len(index), generator=generator).to(index.device)
            for part in order.split(4 * DECODE_SLICE_SIZE):  # decoded as they are read: a pass can be large
                images = pipe.numpy_to_pil(pipe.decode(latents[part], index[part]).cpu().float()
                                           .permute(0, 2, 3, 1).numpy())
                labels = store.component_class[index[part]].tolist()
                soft_labels = store.soft_labels[index[part]].float().tolist()
                for image, label, soft_label in zip(images, labels, soft_labels):
                    yield {"image": image, "label": label, "soft_label": soft_label}


# Keyword arguments that belong to the snapshot download, not to diffusers' folder loading.
_HUB_KEYS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def _download_snapshot(repo_id: str, kwargs: dict) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, **{k: kwargs[k] for k in _HUB_KEYS if k in kwargs}))


def _load_kwargs(kwargs: dict) -> dict:
    # Everything Hub-related was resolved by the download; the rest (torch_dtype, ...) goes to diffusers.
    return {k: v for k, v in kwargs.items() if k not in _HUB_KEYS}
