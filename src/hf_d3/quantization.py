"""A D3 pipeline's floating tensors stored in fewer bits: the `storage_dtype` of its components (docs/method.md,
Storage).

- `float32`: every tensor as the module holds it, today's files bit for bit.
- `float16` / `bfloat16`: every floating tensor cast.
- `int8`: a tensor of two or more dimensions as int8 with a float32 scale per channel (its absolute maximum / 127),
  saved beside it as `<name>.scale`: a weight's output channel (dimension 1 of a transposed convolution, dimension 0
  of the others), a Gaussian's mean or log-variances, a component's soft label (so 8-bit probabilities). A vector
  (biases, BatchNorm's affine parameters and statistics) stays float32: one scale for a running variance that spans
  decades would round its small entries to zero, and vectors are a fraction of a per cent of the values.

Integer tensors (class ids, BatchNorm's batch count) are stored as they are. Storing happens when a component is
saved (`StoredInDtype.save_pretrained`), restoring float32 when it is loaded; `hf_d3.storage` counts the bytes
with `stored_bytes`, the one rule for what a tensor costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8")
SCALE_SUFFIX = ".scale"
SCALE_BYTES = 4  # an int8 tensor's scales are float32
# Bytes of one stored value of a tensor of rows, its scales aside (float32 stores the held dtype's: 4 as trained).
VALUE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
_HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def check_storage_dtype(storage_dtype: str) -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype={storage_dtype!r} is not valid; choose one of {list(STORAGE_DTYPES)}")


def stored_bytes(shape: Sequence[int], storage_dtype: str, held_itemsize: int = 4, channel_axis: int = 0) -> int:
    """Bytes a floating tensor of `shape` takes in a file of `storage_dtype` (`held_itemsize`: bytes per value of
    the module's own dtype, what `float32` stores), its int8 scales included."""
    values = math.prod(shape)
    if storage_dtype == "float32":
        return values * held_itemsize
    if storage_dtype in _HALF_DTYPES:
        return values * VALUE_BYTES[storage_dtype]
    if len(shape) < 2:
        return values * VALUE_BYTES["float32"]  # a vector stays float32
    return values * VALUE_BYTES["int8"] + SCALE_BYTES * shape[channel_axis]


def quantised(state_dict: Mapping[str, torch.Tensor], storage_dtype: str,
              channel_axes: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """`state_dict` as stored in `storage_dtype`: its floating tensors cast, or int8 with `<name>.scale` beside
    them (per channel along `channel_axes[name]`, default 0)."""
    check_storage_dtype(storage_dtype)
    stored = {}
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point() or storage_dtype == "float32":
            stored[name] = tensor
        elif storage_dtype in _HALF_DTYPES:
            stored[name] = tensor.to(_HALF_DTYPES[storage_dtype])
        elif tensor.dim() < 2:
            stored[name] = tensor.float()
        else:
            axis = (channel_axes or {}).get(name, 0)
            absmax = tensor.float().abs().amax(dim=[d for d in range(tensor.dim()) if d != axis], keepdim=True)
            scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))  # a zero channel stays zero
            stored[name] = (tensor / scale).round().clamp(-127, 127).to(torch.int8)
            stored[name + SCALE_SUFFIX] = scale
    return stored


def dequantise(state_dict: dict[str, torch.Tensor]) -> None:
    """Restore float32 in place in a `state_dict` of any storage dtype (a float32 one is left as it is)."""
    for name in [n for n in state_dict if n.endswith(SCALE_SUFFIX)]:
        scale = state_dict.pop(name)
        weight = name.removesuffix(SCALE_SUFFIX)
        state_dict[weight] = state_dict[weight].float() * scale
    for name, tensor in state_dict.items():
        if tensor.dtype in _HALF_DTYPES.values():
            state_dict[name] = tensor.float()


class StoredInDtype:
    """A diffusers `ModelMixin` whose config's `storage_dtype` says how `save_pretrained` stores its floating
    tensors; `from_pretrained` restores them to float32, whatever the file holds. In memory it is a float32 module:
    `set_storage_dtype` gives it what a load of its file would."""

    def _channel_axes(self) -> dict[str, int]:
        return {f"{name}.weight": 1 for name, module in self.named_modules() if isinstance(module, nn.ConvTranspose2d)}

    def _compact(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors a file holds for `state_dict` before quantisation (a subclass may store a part in a compact
        form); `_expand` undoes it at load. Default: as they are."""
        return state_dict

    def _expand(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Undo `_compact` in place in a loaded, dequantised `state_dict`."""

    def save_pretrained(self, *args, **kwargs) -> None:
        storage_dtype = self.config.storage_dtype

        def store(module, state_dict, prefix, local_metadata):
            stored = quantised(self._compact(state_dict), storage_dtype, self._channel_axes())
            state_dict.clear()
            state_dict.update(stored)

        hook = self.register_state_dict_post_hook(store)
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            hook.remove()

    def _fix_state_dict_keys_on_load(self, state_dict: dict[str, torch.Tensor]) -> None:
        # diffusers' ModelMixin.from_pretrained calls this on the file's tensors before it puts them in the module,
        # which it may build on the meta device, so a load_state_dict hook would never run.
        super()._fix_state_dict_keys_on_load(state_dict)
        dequantise(state_dict)
        self._expand(state_dict)

    @torch.no_grad()
    def set_storage_dtype(self, storage_dtype: str) -> None:
        """Store in `storage_dtype` from now on, holding what a load of the saved file gives."""
        check_storage_dtype(storage_dtype)
        self.register_to_config(storage_dtype=storage_dtype)
        state_dict = quantised(self.state_dict(), storage_dtype, self._channel_axes())
        dequantise(state_dict)
        self.load_state_dict(state_dict)
