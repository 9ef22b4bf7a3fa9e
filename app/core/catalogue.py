"""The catalogue: every rankable or linkable entity, with its display name.

Videos and games are what the ranker returns; non-video entities (genres, collections,
people) are pages whose ``entity`` task ranks the videos linked to them. The catalogue is a
table in the bundle (``catalogue.npz``) with these columns:

=============  =====  ====================================================================
entity_id      str    stable id, unique
entity_type    str    video | game | genre | collection | person
display_name   str    what the member sees; its tokens impute the query of a page
year           int32  release year, 0 when unknown
genres         str    "|"-joined genre names, "" when none
countries      str    "|"-joined countries where the entity is available; "" = everywhere
link_source    str    (edge list) a non-video entity ...
link_target    str    ... and a video linked to it (genre -> member videos, etc.)
=============  =====  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.core.table_io import load_as, save_table

RANKABLE_TYPES: tuple[str, ...] = ("video", "game")
COLUMNS: tuple[str, ...] = (
    "entity_id",
    "entity_type",
    "display_name",
    "year",
    "genres",
    "countries",
    "link_source",
    "link_target",
)


@dataclass
class Catalogue:
    """Entities in a fixed order; an entity's position is its index everywhere else."""

    entity_id: np.ndarray
    entity_type: np.ndarray
    display_name: np.ndarray
    year: np.ndarray
    genres: np.ndarray
    countries: np.ndarray
    link_source: np.ndarray
    link_target: np.ndarray
    index: dict[str, int] = field(init=False, repr=False)
    country_names: tuple[str, ...] = field(init=False)
    available: np.ndarray = field(init=False, repr=False)  # (C, E) bool
    rankable: np.ndarray = field(init=False, repr=False)  # (E,) bool
    link_indptr: np.ndarray = field(init=False, repr=False)
    link_indices: np.ndarray = field(init=False, repr=False)
    _sorted_order: np.ndarray = field(init=False, repr=False)
    _sorted_ids: np.ndarray = field(init=False, repr=False)
    genre_names: tuple[str, ...] = field(init=False)
    genre_matrix: np.ndarray = field(init=False, repr=False)  # (E, G) float32 0/1, sorted names

    def __post_init__(self) -> None:
        n = len(self.entity_id)
        for name in ("entity_type", "display_name", "year", "genres", "countries"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"catalogue column {name} has {len(getattr(self, name))} rows, "
                    f"entity_id has {n}"
                )
        self.index = {eid: i for i, eid in enumerate(self.entity_id.tolist())}
        if len(self.index) != n:
            raise ValueError("catalogue entity_id must be unique")
        self._sorted_order = np.argsort(self.entity_id, kind="stable")
        self._sorted_ids = self.entity_id[self._sorted_order]
        self.rankable = np.isin(self.entity_type, RANKABLE_TYPES)
        per_entity = [c.split("|") if c else [] for c in self.countries.tolist()]
        self.country_names = tuple(sorted({c for cs in per_entity for c in cs}))
        col = {c: i for i, c in enumerate(self.country_names)}
        self.available = np.zeros((len(self.country_names), n), dtype=bool)
        for e, cs in enumerate(per_entity):
            if not cs:
                self.available[:, e] = True
            for c in cs:
                self.available[col[c], e] = True
        per_genre = [[g for g in gs.split("|") if g] for gs in self.genres.tolist()]
        self.genre_names = tuple(sorted({g for gs in per_genre for g in gs}))
        gcol = {g: i for i, g in enumerate(self.genre_names)}
        self.genre_matrix = np.zeros((n, len(self.genre_names)), dtype=np.float32)
        for e, gs in enumerate(per_genre):
            self.genre_matrix[e, [gcol[g] for g in gs]] = 1.0
        self._build_links()

    def _build_links(self) -> None:
        unknown = sorted(
            set(self.link_source.tolist()) - self.index.keys()
            | set(self.link_target.tolist()) - self.index.keys()
        )
        if unknown:
            raise ValueError(f"catalogue links name unknown entities: {unknown[:5]}")
        src = np.array([self.index[s] for s in self.link_source.tolist()], dtype=np.int64)
        dst = np.array([self.index[t] for t in self.link_target.tolist()], dtype=np.int64)
        order = np.lexsort((dst, src))
        self.link_indices = dst[order]
        counts = np.bincount(src, minlength=len(self))
        self.link_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.entity_id)

    def linked(self, entity: int) -> np.ndarray:
        """Indices of the videos linked to entity index ``entity`` (empty for most videos)."""
        return self.link_indices[self.link_indptr[entity] : self.link_indptr[entity + 1]]

    def available_in(self, country: str) -> np.ndarray:
        """(E,) bool: rankable entities available in ``country``; unknown country = all."""
        if country in self.country_names:
            return self.available[self.country_names.index(country)] & self.rankable
        return self.rankable

    def name_of(self, entity_id: str) -> str | None:
        """Display name of ``entity_id``, ``None`` when unknown (the ``source_name`` that
        ``app.core.context.impute_context`` takes)."""
        i = self.index.get(entity_id)
        return None if i is None else str(self.display_name[i])

    def lookup(self, entity_ids: np.ndarray) -> np.ndarray:
        """Vectorised id -> index for an array of ids; -1 where the id is unknown."""
        ids = np.asarray(entity_ids, dtype=str)
        if len(self) == 0 or len(ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self._sorted_ids, ids), 0, len(self) - 1)
        found = self._sorted_ids[pos] == ids
        return np.where(found, self._sorted_order[pos], -1).astype(np.int64)

    def indices_of(self, entity_ids: list[str]) -> tuple[np.ndarray, list[str]]:
        """Indices of known ids (in order, duplicates removed) and the list of unknown ids."""
        seen: set[int] = set()
        known: list[int] = []
        unknown: list[str] = []
        for eid in entity_ids:
            i = self.index.get(eid)
            if i is None:
                unknown.append(eid)
            elif i not in seen:
                seen.add(i)
                known.append(i)
        return np.array(known, dtype=np.int64), unknown

    def columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in COLUMNS}

    @classmethod
    def from_columns(cls, columns: dict[str, np.ndarray]) -> Catalogue:
        return cls(
            entity_id=np.asarray(columns["entity_id"], dtype=str),
            entity_type=np.asarray(columns["entity_type"], dtype=str),
            display_name=np.asarray(columns["display_name"], dtype=str),
            year=np.asarray(columns["year"], dtype=np.int32),
            genres=np.asarray(columns["genres"], dtype=str),
            countries=np.asarray(columns["countries"], dtype=str),
            link_source=np.asarray(columns["link_source"], dtype=str),
            link_target=np.asarray(columns["link_target"], dtype=str),
        )

    def save(self, path: Path) -> None:
        save_table(path, self.columns())

    @classmethod
    def load(cls, path: Path) -> Catalogue:
        return load_as(path, COLUMNS, cls.from_columns)
