"""Every model a run builds from its config: the latent store and decoder of a subtask, the expert / teacher
network, and the storage those sizes give (counted from the sizes, nothing built)."""

from __future__ import annotations

import torch
from torch import nn

from .config import D3Config, DataConfig, ExpertConfig, RepresentationConfig
from .models.classifiers import build_classifier
from .models.decoder import D3Decoder, preset_sizes
from .models.latent_store import GaussianLatentStore
from .storage import StorageReport, storage_report


def _check_concrete(sizes: RepresentationConfig) -> None:
    if sizes.chosen_by_budget:
        raise ValueError("these sizes are still to be chosen from storage_budget_ipc: resolve them with "
                         "hf_d3.sizing.resolve_sizes(config, num_classes) first")


def decoder_arguments(sizes: RepresentationConfig, data: DataConfig, num_subtasks: int = 1) -> dict:
    """The `D3Decoder` arguments of these sizes (a preset, or the given channels), one generator per subtask."""
    _check_concrete(sizes)
    if sizes.decoder_preset:
        return {"resolution": data.resolution, "out_channels": data.channels, "num_subtasks": num_subtasks,
                **preset_sizes(sizes.decoder_preset, data.resolution, latent_dim=sizes.latent_dim,
                               upsample_mode=sizes.decoder_upsample)}
    return dict(
        latent_dim=sizes.latent_dim, resolution=data.resolution, out_channels=data.channels,
        channels=sizes.decoder_channels, latent_projection=sizes.decoder_latent_projection,
        upsample_kernel_size=sizes.decoder_kernel_size, upsample_mode=sizes.decoder_upsample,
        num_subtasks=num_subtasks,
    )


def build_decoder(sizes: RepresentationConfig, data: DataConfig, num_subtasks: int = 1) -> D3Decoder:
    """A fresh decoder of these sizes with one generator per subtask."""
    return D3Decoder(**decoder_arguments(sizes, data, num_subtasks))


def latent_store_arguments(sizes: RepresentationConfig, class_ids: list[int], class_names: list[str],
                           subtask_sizes: list[int] | None = None) -> dict:
    """The `GaussianLatentStore` arguments of these sizes for `class_ids` (of `class_names`' label space)."""
    _check_concrete(sizes)
    return dict(class_ids=class_ids, num_classes=len(class_names), latents_per_class=sizes.latents_per_class,
                latent_dim=sizes.latent_dim, class_names=class_names, subtask_sizes=subtask_sizes,
                logvar_dim=sizes.logvar_dim, label_top_k=sizes.label_top_k)


def build_latent_store(sizes: RepresentationConfig, class_ids: list[int], class_names: list[str],
                       subtask_sizes: list[int] | None = None) -> GaussianLatentStore:
    """A fresh latent store of these sizes for `class_ids` (of `class_names`' label space)."""
    return GaussianLatentStore(**latent_store_arguments(sizes, class_ids, class_names, subtask_sizes))


def net_kwargs(architecture: str, width: int, depth: int) -> dict:
    """The size arguments of `build_classifier`: `net_width` and `net_depth` size the ConvNet; ResNet-18 keeps
    its standard width (64), which the ConvNet's 128 would quadruple."""
    return {"width": width, "depth": depth} if architecture == "convnet" else {}


def build_net(experts: ExpertConfig, data: DataConfig, num_labels: int, device: torch.device | str = "cpu"
              ) -> nn.Module:
    """An expert, MMD embedding or teacher network (`architecture`, `net_width`, `net_depth`)."""
    return build_classifier(experts.architecture, data.channels, data.resolution, num_labels,
                            **net_kwargs(experts.architecture, experts.net_width, experts.net_depth)).to(device)


def planned_storage(config: D3Config, plan: list[list[int]]) -> StorageReport:
    """The storage of the whole pipeline these sizes give for this subtask plan, stored in `storage_dtype`; fails
    before any work if it exceeds `storage_budget_ipc` (in `budget_unit`)."""
    sizes = config.representation
    class_ids = [c for block in plan for c in block]
    store = latent_store_arguments(sizes, class_ids, [str(c) for c in class_ids], [len(block) for block in plan])
    report = storage_report({**store, "storage_dtype": sizes.storage_dtype},
                            {**decoder_arguments(sizes, config.data, len(plan)), "storage_dtype": sizes.storage_dtype})
    in_bytes = sizes.budget_unit == "bytes"
    used = report.ipc_equivalent_bytes if in_bytes else report.ipc_equivalent
    if sizes.storage_budget_ipc is not None and used > sizes.storage_budget_ipc:
        unit = "bytes" if in_bytes else "values"
        stored = (f"{report.total_bytes:,} bytes in {sizes.storage_dtype} = {used:.2f} IPC-equivalent in bytes"
                  if in_bytes else f"{report.total_values:,} values = {used:.2f} IPC-equivalent")
        detail = ", ".join(f"{name} {getattr(report, f'{part}_{unit}'):,}"
                           for name, part in (("decoder", "decoder"), ("latents", "latent"), ("labels", "label")))
        raise ValueError(
            f"these sizes store {stored}, over storage_budget_ipc={sizes.storage_budget_ipc} ({detail}); shrink "
            "latents_per_class, latent_dim or decoder_channels, or let the budget choose them: --sizes auto (which "
            "drops a config file's sizes)"
        )
    return report
