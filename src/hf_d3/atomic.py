"""Atomic writes: a file or folder appears under its final name only once it is complete.

A rerun trusts what it finds (a finished expert, subtask, checkpoint or run), so every writer of something that
marks work finished goes through `staged`: a job killed mid-write leaves the previous version or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
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
