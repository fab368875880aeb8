"""Write a folder completely or not at all."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields an empty temporary folder next to `path` that replaces `path` when the block succeeds.

    An existing `path` is moved aside before the new folder takes its name and deleted after, so at
    every moment one complete version exists. If the block raises (or is interrupted), the
    temporary folder is removed and `path` is left as it was. Callers decide beforehand whether
    replacing an existing `path` is allowed.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = tmp.with_suffix(".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
