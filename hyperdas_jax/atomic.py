"""Write a folder completely or not at all."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(path: pathlib.Path) -> None:
    """Removes the temporary siblings of `path` left by writers that were killed (their process is gone)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        parts = stale.name[len(path.name) + 2:].split(".")
        if parts and parts[0].isdigit() and not _alive(int(parts[0])):
            shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(stale.with_suffix(".old"), ignore_errors=True)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields an empty temporary folder next to `path` that replaces `path` when the block succeeds.

    An existing `path` is moved aside before the new folder takes its name and deleted after, so at
    every moment one complete version exists. If the block raises (or is interrupted), the
    temporary folder is removed and `path` is left as it was; temporary folders of writers that were
    killed outright are removed by the next writer. The folder gets the usual permissions (umask),
    not the private ones of a temporary folder. Callers decide beforehand whether replacing an
    existing `path` is allowed.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            old = tmp.with_suffix(".old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
