"""Progress bars for the long loops, drawn by the local main process only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from accelerate import PartialState
from tqdm.auto import tqdm


def progress_bar(iterable: Iterable, **tqdm_kwargs: Any) -> tqdm:
    """`tqdm(iterable, **tqdm_kwargs)`, disabled on every process but the local main one: with 8 ranks on a
    machine, 8 bars redrawing over one another in one terminal are unreadable.

    `TQDM_DISABLE=1` still hides every bar (tqdm reads it itself). `PartialState()` is the process state an
    `Accelerator` shares; outside a launched job it is a single process, the local main one.
    """
    if not PartialState().is_local_main_process:
        tqdm_kwargs["disable"] = True
    return tqdm(iterable, **tqdm_kwargs)
