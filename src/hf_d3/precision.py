"""Mixed precision: where bf16 autocast (Accelerate's `mixed_precision`) is switched back off.

Under `mixed_precision: bf16` the whole run is inside the accelerator's autocast region (`hf_d3.run`), so experts,
the MMD embedding, the teacher and the students run their matmuls and convolutions in bf16. The decoder and the
trajectory-matching unroll opt out with `full_precision`: their gradients lost 9-18 % in bf16
(benchmarks/results/mtt_precision.json).
"""

from __future__ import annotations

import contextlib

import torch


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A region where autocast is off on `device`'s type (ops run in their inputs' dtype); a no-op for device types
    without autocast (the meta device the tests use to prove the unroll never reads a value on the host)."""
    device_type = torch.device(device).type
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 if it is in a lower precision (bf16 out of an autocast region); float64 stays."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
