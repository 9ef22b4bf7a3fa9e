"""The unified engagement log: one row per (request context, impressed target).

Every task writes the same columns, so one model trains on engagements pooled from all
tasks. Context columns hold the RAW request values: an absent value is the empty string,
and ``app.core.context.impute_context`` turns it into the paper's explicit tokens, in training
exactly as in serving.

Columns (all numpy arrays of equal length):

==================  =======  ===========================================================
impression_id       int64    one request (one keystroke, one page view); rows of the same
                             impression share the context and differ in target
timestamp           int64    seconds since the epoch
task                str      search | prequery | more_like_this | entity
user_id             str      member id, "" when logged out
query               str      what was typed (search), "" otherwise
country             str      ISO country code, "" when unknown
source_entity_id    str      the page's entity (more_like_this, entity), "" otherwise
target_entity_id    str      the impressed entity
label               int8     1 = positive engagement (click/play), 0 = impressed only
==================  =======  ===========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from app.core.context import TASKS
from app.core.table_io import load_as, save_table


@dataclass(frozen=True)
class EngagementLog:
    """Column arrays of the unified log; see the module docstring for the schema."""

    impression_id: np.ndarray
    timestamp: np.ndarray
    task: np.ndarray
    user_id: np.ndarray
    query: np.ndarray
    country: np.ndarray
    source_entity_id: np.ndarray
    target_entity_id: np.ndarray
    label: np.ndarray

    def __post_init__(self) -> None:
        lengths = {f.name: len(getattr(self, f.name)) for f in fields(self)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"engagement log columns differ in length: {lengths}")
        bad = sorted(set(np.unique(self.task).tolist()) - set(TASKS))
        if bad:
            raise ValueError(f"engagement log task must be one of {TASKS}, got {bad}")

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray]) -> EngagementLog:
        return cls(
            impression_id=np.asarray(columns["impression_id"], dtype=np.int64),
            timestamp=np.asarray(columns["timestamp"], dtype=np.int64),
            task=np.asarray(columns["task"], dtype=str),
            user_id=np.asarray(columns["user_id"], dtype=str),
            query=np.asarray(columns["query"], dtype=str),
            country=np.asarray(columns["country"], dtype=str),
            source_entity_id=np.asarray(columns["source_entity_id"], dtype=str),
            target_entity_id=np.asarray(columns["target_entity_id"], dtype=str),
            label=np.asarray(columns["label"], dtype=np.int8),
        )

    def columns(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, mask: np.ndarray) -> EngagementLog:
        """Rows where ``mask`` (bool array or index array) holds."""
        return EngagementLog(**{name: col[mask] for name, col in self.columns().items()})

    def rows_per_task(self) -> dict[str, int]:
        return {task: int(np.sum(self.task == task)) for task in TASKS}

    def save(self, path: Path) -> None:
        save_table(path, self.columns())

    @classmethod
    def load(cls, path: Path) -> EngagementLog:
        return load_as(path, tuple(f.name for f in fields(cls)), cls.from_columns)
