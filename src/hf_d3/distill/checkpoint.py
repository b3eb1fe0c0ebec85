"""A subtask's distillation checkpoint: everything `distill_subtask` needs to continue exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import staged
from ..models.decoder import D3Decoder
from ..models.latent_store import GaussianLatentStore

PROGRESS_FILE = "progress.json"


def save_checkpoint(folder: Path, store: GaussianLatentStore, decoder: D3Decoder, syn_lr: torch.Tensor,
                    optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator, progress: dict) -> None:
    """Latents, decoder, optimiser states, the learnable lr and the generator (`state.safetensors`), and
    `progress.json`, swapped in whole: a job killed mid-write leaves the previous checkpoint."""
    with staged(folder) as staging:
        store.save_pretrained(staging / "latent_store")
        decoder.save_pretrained(staging / "decoder")
        # on the host: the loop's tensors live on the accelerator's device (load_state_dict moves them back)
        tensors = {f"optimizer.{name}.{index}.{key}": value.detach().cpu().clone()
                   for name, opt in optimizers.items() for index, state in opt.state_dict()["state"].items()
                   for key, value in state.items() if isinstance(value, torch.Tensor)}
        tensors |= {"syn_lr": syn_lr.detach().reshape(1).cpu().clone(), "generator": generator.get_state()}
        save_file(tensors, staging / "state.safetensors")
        (staging / PROGRESS_FILE).write_text(json.dumps(progress))


def has_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a complete `save_checkpoint` (its progress file is written last)."""
    return (folder / PROGRESS_FILE).is_file()


def load_checkpoint(folder: Path, store: GaussianLatentStore, decoder: D3Decoder, syn_lr: torch.Tensor,
                    optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator) -> dict:
    """Load a `save_checkpoint` folder into these modules, optimisers and generator; returns its progress. Its
    modules are of these sizes: the sizes are in the key of the subtask stage it belongs to (`hf_d3.stages`)."""
    for module, saved in ((store, GaussianLatentStore.from_pretrained(folder / "latent_store")),
                          (decoder, D3Decoder.from_pretrained(folder / "decoder"))):
        module.load_state_dict(saved.state_dict())
    tensors = load_file(folder / "state.safetensors")
    for name, opt in optimizers.items():
        state = {}
        for key, value in tensors.items():
            if key.startswith(f"optimizer.{name}."):
                index, field = key.removeprefix(f"optimizer.{name}.").split(".")
                state.setdefault(int(index), {})[field] = value
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    with torch.no_grad():
        syn_lr.copy_(tensors["syn_lr"][0])
    generator.set_state(tensors["generator"])
    return json.loads((folder / PROGRESS_FILE).read_text())
