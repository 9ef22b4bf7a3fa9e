"""Columnar tables stored as ``.npz`` files (numpy only, no pickle).

The engagement log, the catalogue and the feature tables are all dicts of numpy arrays on
disk; this module is the one place that reads and writes them, and checks their columns.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


class TableError(ValueError):
    """A table file is missing, unreadable, or lacks a required column."""


def save_table(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Write ``columns`` to ``path`` (an ``.npz``), creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        np.savez(fh, allow_pickle=False, **columns)


def load_table(path: Path, required: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Read an ``.npz`` table; raise ``TableError`` naming the file and any missing column."""
    if not path.is_file():
        raise TableError(f"{path}: table file does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            columns = {name: data[name] for name in data.files}
    except Exception as exc:  # zipfile / format errors all mean "unreadable"
        raise TableError(f"{path}: cannot read table ({exc})") from exc
    missing = [name for name in required if name not in columns]
    if missing:
        raise TableError(f"{path}: missing required column(s) {missing}")
    return columns


def load_as(
    path: Path, required: tuple[str, ...], build: Callable[[dict[str, np.ndarray]], T]
) -> T:
    """``build`` the object a table holds; a ``ValueError`` it raises (inconsistent
    columns) becomes a ``TableError`` naming the file."""
    columns = load_table(path, required=required)
    try:
        return build(columns)
    except ValueError as exc:
        if isinstance(exc, TableError):
            raise
        raise TableError(f"{path}: {exc}") from exc
