"""glibc malloc settings for the trajectory-matching unroll on a CPU (benchmarks/results/mtt_iteration.json; the
Makefile exports them).

Torch's CPU allocator calls malloc/free directly. glibc serves every block above `M_MMAP_THRESHOLD` (128 KiB by
default, and setting `MALLOC_TRIM_THRESHOLD_` / `MALLOC_TOP_PAD_` freezes it there) with a fresh `mmap`, so each
of the unroll's thousands of 10 MB activations per iteration is zero-filled page by page by the kernel: on the CPU
box that was a third of the wall time (sys time 11 s of 41 s, 3.2 million page faults for 5 iterations). Raising the
threshold above the largest activation keeps those blocks in the heap, reused without faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# 32 MiB is glibc's largest mmap threshold on 64-bit (larger values are refused); trim and pad as the Makefile's
# environment has them, capped at what mallopt's int argument holds.
SETTINGS = {
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 2**31 - 1),
    "MALLOC_TOP_PAD_": (M_TOP_PAD, 2**30),
}
OPT_OUT = "HF_D3_TUNE_MALLOC"

_tuned: dict[str, bool] = {}


def tune_malloc() -> dict[str, bool]:
    """Apply `SETTINGS` to this process's glibc malloc, once; returns which were set.

    A setting the environment already gives (`MALLOC_MMAP_THRESHOLD_=...`) is left to it, `HF_D3_TUNE_MALLOC=0`
    turns the whole thing off, and anything but Linux with glibc is left alone. The cost: freed memory stays in the
    process (up to the trim threshold) instead of going back to the system, so the resident size stays near its
    peak, which is what the unroll reaches every iteration anyway.
    """
    if _tuned or os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return dict(_tuned)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for env, (param, value) in SETTINGS.items():
        _tuned[env] = env not in os.environ and mallopt(param, value) == 1
    logger.debug("malloc settings applied: %s", _tuned)
    return dict(_tuned)
