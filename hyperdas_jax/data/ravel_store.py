"""Saves and loads RAVEL row sets as HF `datasets` arrow folders, the original HyperDAS format."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import datasets

from hyperdas_jax.atomic import atomic_directory
from hyperdas_jax.data.ravel_raw import RavelError
from hyperdas_jax.data.ravel_schema import ROW_COLUMNS, as_row_list


def save_rows(
    rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, *, overwrite: bool = False,
    columns: Sequence[str] = (),
) -> pathlib.Path:
    """Writes rows with `Dataset.save_to_disk`, all columns typed string.

    The folder is written under a temporary name next to `path` and renamed at the end, so an
    error leaves neither a partial folder nor a temporary one behind.

    Args:
        rows: dicts holding at least ROW_COLUMNS (extra columns are kept), all values strings,
            every row with the same keys.
        path: output folder.
        overwrite: replace an existing folder; otherwise an existing `path` is an error.
        columns: extra columns (beyond ROW_COLUMNS) of an empty split; rows bring their own.

    Returns:
        The output folder.
    """
    path = pathlib.Path(path)
    rows = as_row_list(rows)
    if path.exists() and not overwrite:
        raise RavelError(f"output folder already exists: {path}")
    columns = list(ROW_COLUMNS) + [c for c in (rows[0] if rows else columns) if c not in ROW_COLUMNS]
    for i, row in enumerate(rows):
        if set(row) != set(columns):
            raise RavelError(f"row {i} has columns {sorted(row)}, expected {sorted(columns)}")
        bad = [c for c in columns if not isinstance(row[c], str)]
        if bad:
            raise RavelError(f"row {i}: columns {bad} are not strings")
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    table = {c: [row[c] for row in rows] for c in columns}

    with atomic_directory(path) as tmp:
        # An empty Dataset would otherwise be saved as zero shards, which load_from_disk cannot read.
        datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp), num_shards=1 if not rows else None)
    return path


def load_rows(path: str | os.PathLike) -> datasets.Dataset:
    """Loads a folder written by `save_rows` or by the original HyperDAS notebooks.

    Args:
        path: a `save_to_disk` folder of one Dataset.

    Returns:
        The dataset; it has at least ROW_COLUMNS, all strings.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise RavelError(f"RAVEL dataset folder not found: {path}")
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise RavelError(f"cannot load RAVEL dataset from {path}: {e}") from e
    if not isinstance(dataset, datasets.Dataset):
        raise RavelError(f"{path} holds a {type(dataset).__name__}, expected one Dataset")
    missing = [c for c in ROW_COLUMNS if c not in dataset.column_names]
    if missing:
        raise RavelError(f"RAVEL dataset {path} lacks columns {missing}")
    not_str = [c for c in ROW_COLUMNS if dataset.features[c] != datasets.Value("string")]
    if not_str:
        raise RavelError(f"RAVEL dataset {path}: columns {not_str} are not strings")
    return dataset
