"""Atomic writes: a file or folder appears under its final name only once it is complete.

A rerun trusts what it finds (a finished expert, subtask, checkpoint or run), so every writer of something that
marks work finished goes through `staged`: a job killed mid-write leaves the previous version or nothing.
`kill_point` marks the places tests/integration/test_kill_resume.py kills a run at (inert unless HF_D3_KILL_AT names
one).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Fault injection, for testing that a run survives being killed anywhere: with `HF_D3_KILL_AT="<name>:<n>"`
    in the environment (and `HF_D3_KILL_RANK`, if set, equal to this process's `RANK`), the process SIGKILLs
    itself the n-th time it reaches the point `name` (or sends itself `HF_D3_KILL_SIGNAL`: SIGSTOP makes a hung
    process). Without them, nothing happens."""
    point, _, count = os.environ.get("HF_D3_KILL_AT", "").rpartition(":")
    if point != name or os.environ.get("HF_D3_KILL_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(count):
        os.kill(os.getpid(), signal.Signals[os.environ.get("HF_D3_KILL_SIGNAL", "SIGKILL")])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _disk_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(error)


@contextmanager
def staged(final: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a staging path beside `final` (a file or a folder) to write; on success it takes `final`'s name.

    With `replace=False`, a `final` that another process published meanwhile is kept and the staged copy dropped
    (ranks that build the same cache). A file is swapped in with one `os.replace`; a folder replaces an old one by
    removal then rename, so whatever marks it finished (a file inside) must be checked, not the folder's name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f"{final.name}.partial-{os.getpid()}")
    _remove(staging)
    if replace:  # one writer per `final`: what a killed one left half-written goes (a cache's racers keep theirs)
        for stale in final.parent.glob(f"{glob.escape(final.name)}.partial-*"):
            _remove(stale)
    try:
        yield staging
    except BaseException as error:
        _remove(staging)
        if _disk_full(error):  # safetensors reports it as text: say what could not be written, and what to do
            raise OSError(errno.ENOSPC, f"no space left on the device to write {final} ({error}); free some space "
                          "or choose another output_dir, then rerun: the work finished so far is kept") from error
        raise
    kill_point(f"write {final.name}")  # written in full, not yet under its final name
    if final.exists() and not replace:
        _remove(staging)
        return
    if staging.is_dir() and final.exists():
        _remove(final)
    try:
        os.replace(staging, final)
    except OSError:
        if replace or not final.exists():
            raise
        _remove(staging)  # another process won the race


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    """Write `value` as JSON to `path` atomically."""
    with staged(path) as staging:
        staging.write_text(json.dumps(value, indent=indent))
