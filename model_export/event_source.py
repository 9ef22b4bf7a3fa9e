"""Training data from the service's own event logs: impressions joined with engagements.

The service writes two kinds of Parquet files into one directory (several files of each;
``*.tmp`` files are writes in progress and are never read; ``impression-*.parquet`` and
``engagement-*.parquet``, the names ``app.serving.events.FileSink`` gives them, are read
too):

- ``impressions-*.parquet``: one row per ``/rank`` answer, what was shown: ``request_id``,
  ``ts`` (epoch seconds, the service's clock), the context the service used AFTER
  imputation (``task``, ``user``, ``user_hashed``, ``query``, ``country``,
  ``source_entity_id``), ``personalization``, ``model_version``, ``cache``, and
  ``entity_ids`` / ``scores`` in the order shown (position = list index, 0-based);
- ``engagements-*.parquet``: one row per frontend event: ``event_id``, ``request_id``,
  ``entity_id``, ``type`` (play, click, add_to_list, ...), ``ts`` (the client's clock) and
  ``received_ts`` (the service's clock).

``load_events`` turns them into the unified ``EngagementLog``: one row per (impression,
shown entity) that the position rule keeps, label 1 where that entity was engaged for that
request id. The rules (docs/MODEL.md, "Training from the service's events"); every
impression and every engagement is either used or counted in exactly one reason:

Impressions, in this order:
  duplicate      the same request id again (a retried write): the earliest counts once
  invalid        no request id, no finite ts, an unknown task, or a context the
                 imputation refuses (search without a query, a page without a source)
  unknown source (with a catalogue) a page whose source entity is not in it

Engagements, in this order:
  duplicate      the same event id again (a client retry): counts once
  unknown type   a type that is not a positive one (``positive_types``): ignored
  orphan         its request id has no impression (yet: a later file may hold it)
  unshown        its entity was not shown in that impression
  late           more than ``max_delay_s`` after the impression by BOTH clocks: by the
                 server's ``received_ts`` (never earlier than the act itself, so a
                 client clock running ahead cannot make an event late) and by the
                 client's ``ts`` (so an event buffered offline and sent later, but done
                 in time, is kept)
  (skewed)       kept, but counted: the client's ts is before the impression's

Context columns are mapped back to the raw values the log holds (``""`` for absent):
``UNKNOWN_USER``, ``UNKNOWN_COUNTRY`` and ``NULL_SOURCE`` become ``""``; the query of a
pre-query is ``""``; the query of a page (more_like_this, entity) is ``""`` where it is
the imputed one, the source's normalised display name (without a catalogue every page
query is taken as imputed). ``impute_context`` then rebuilds, at training, the context the
service used, ``query_imputed`` included.

Position bias, the cascade rule: the position shown is kept (``EventJoinReport.position``,
aligned with the log's rows). Members scan a list from the top: rows above an engaged one
were examined and skipped (reliable negatives), rows far below the last engaged one were
most likely never seen, and a label 0 there says nothing about the entity. So of an
impression with engagements, rows down to the lowest engaged position plus
``examined_margin`` (default 1: the row just below a click is usually looked at) are kept;
of an impression without any, the top ``unengaged_depth`` rows (default 2: the first two
are looked at about equally often, attention drops after them). The rest are dropped and
counted. ``None`` for either keeps every shown row of such impressions.

``impression_id`` is a stable int per request id (64 bits of its blake2b hash, so the same
request keeps its id when more files arrive); ``timestamp`` is the impression's ``int(ts)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.core.bundle import CATALOGUE_FILE
from app.core.catalogue import Catalogue
from app.core.context import (
    NULL_SOURCE,
    TASKS,
    UNKNOWN_COUNTRY,
    UNKNOWN_USER,
    Task,
    normalise_query,
)
from model_export.engagement_log import EngagementLog

IMPRESSIONS_GLOB = "impressions-*.parquet"
ENGAGEMENTS_GLOB = "engagements-*.parquet"
# The names app.serving.events.FileSink writes ({kind}-{stamp}-{pid}-{seq}.parquet).
FILE_SINK_GLOBS = {
    IMPRESSIONS_GLOB: "impression-*.parquet",
    ENGAGEMENTS_GLOB: "engagement-*.parquet",
}
POSITIVE_TYPES: tuple[str, ...] = ("play", "click", "add_to_list")
MAX_DELAY_S = 24 * 3600.0
EXAMINED_MARGIN = 1  # rows kept below the lowest engaged one
UNENGAGED_DEPTH = 2  # rows kept of an impression without engagement
POSITION_BUCKETS = 10  # positives_by_position: positions 0..9, then 10 and beyond

# The columns read (the contract has more: personalization, model_version, cache, scores).
IMPRESSION_COLUMNS: dict[str, Any] = {
    "request_id": pa.string(),
    "ts": pa.float64(),
    "task": pa.string(),
    "user": pa.string(),
    "user_hashed": pa.bool_(),
    "query": pa.string(),
    "country": pa.string(),
    "source_entity_id": pa.string(),
    "entity_ids": pa.list_(pa.string()),
}
ENGAGEMENT_COLUMNS: dict[str, Any] = {
    "event_id": pa.string(),
    "request_id": pa.string(),
    "entity_id": pa.string(),
    "type": pa.string(),
    "ts": pa.float64(),
    "received_ts": pa.float64(),
}


@dataclass
class EventJoinReport:
    """What was read, what was dropped and why, and what was produced. Every impression
    and engagement read is used or counted in one reason (the module docstring's order).
    ``position`` (0-based rank shown) is aligned with the returned log's rows."""

    impression_files: int = 0
    engagement_files: int = 0
    impressions_read: int = 0
    impressions_duplicate: int = 0  # the same request id again (counted once)
    impressions_invalid: int = 0  # no request id / ts, unknown task, context refused
    impressions_unknown_source: int = 0  # page source not in the catalogue
    impressions_used: int = 0
    impressions_hashed_user: int = 0  # of those used: a salted hash, not a member id
    impressions_engaged: int = 0  # of those used: at least one engagement kept
    engagements_read: int = 0
    engagements_duplicate: int = 0  # the same event id again (counted once)
    engagements_unknown_type: int = 0  # not a positive type: ignored
    engagements_orphan: int = 0  # no impression with its request id
    engagements_unshown: int = 0  # its entity was not shown in that impression
    engagements_late: int = 0  # more than max_delay_s after the impression
    engagements_used: int = 0
    engagements_skewed: int = 0  # of those used: client ts before the impression
    shown_rows: int = 0  # (impression, entity) pairs shown, a repeated entity once
    shown_repeated: int = 0  # an entity shown twice in one impression: its first place
    rows_dropped_by_position: int = 0  # below the examined depth (cascade rule)
    rows_unknown_entity: int = 0  # target not in the catalogue
    positives_unknown_entity: int = 0  # of those: engaged ones
    rows: int = 0
    positives: int = 0
    unknown_types: dict[str, int] = field(default_factory=dict)  # type -> engagements
    positives_by_position: tuple[int, ...] = ()  # positions 0..9, then 10 and beyond
    position: np.ndarray = field(
        default_factory=lambda: np.zeros(0, dtype=np.int32), repr=False, compare=False
    )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts (without ``position``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "position"}
        out["unknown_types"] = dict(self.unknown_types)
        out["positives_by_position"] = list(self.positives_by_position)
        return out

    def format(self) -> str:
        """The report as the command line prints it: one count per line."""
        lines = ["event join:"]
        for name, value in self.as_dict().items():
            if isinstance(value, dict):
                value = json.dumps(value, sort_keys=True)
            elif isinstance(value, list):
                value = " ".join(str(v) for v in value)
            lines.append(f"  {name:<28}{value}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


# --------------------------------------------------------------------------- reading


def _files(directory: Path, pattern: str) -> list[Path]:
    # The patterns end in .parquet, so *.tmp files (writes in progress) never match.
    paths = {*directory.glob(pattern), *directory.glob(FILE_SINK_GLOBS[pattern])}
    return sorted(p for p in paths if p.is_file() and p.suffix == ".parquet")


def _read(files: list[Path], columns: dict[str, Any]) -> Any:
    """The ``columns`` of every file, cast to one schema and concatenated (a pa.Table)."""
    tables = []
    for path in files:
        try:
            names = set(pq.read_schema(path).names)
            missing = [name for name in columns if name not in names]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}")
            table = pq.read_table(path, columns=list(columns))
            table = pa.table(
                {name: table.column(name).cast(kind) for name, kind in columns.items()}
            )
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: cannot read ({exc})") from exc
        tables.append(table)
    if not tables:
        return pa.table({name: pa.array([], type=kind) for name, kind in columns.items()})
    return pa.concat_tables(tables)


def _strings(table: Any, name: str) -> np.ndarray:
    column = pc.fill_null(table.column(name), "")
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=str)


def _floats(table: Any, name: str) -> np.ndarray:
    return np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)


def _bools(table: Any, name: str) -> np.ndarray:
    return np.asarray(pc.fill_null(table.column(name), False).to_numpy(zero_copy_only=False))


def _lists(table: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(lengths per row, flattened values) of a list<str> column; a null list is empty."""
    column = table.column(name).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    values = pc.fill_null(column.flatten(), "").to_numpy(zero_copy_only=False)
    return np.asarray(lengths, dtype=np.int64), np.asarray(values, dtype=str)


def stable_impression_ids(request_ids: Iterable[str]) -> np.ndarray:
    """A stable non-negative int64 per request id: 63 bits of its blake2b digest."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(r.encode(), digest_size=8).digest(), "big") >> 1
            for r in request_ids
        ],
        dtype=np.int64,
    )


def first_of_each(keys: np.ndarray, order_by: np.ndarray) -> np.ndarray:
    """Bool mask: the first row of each distinct key, by ``order_by`` then row order."""
    order = np.lexsort((np.arange(len(keys)), order_by, keys))
    first = np.ones(len(keys), dtype=bool)
    sorted_keys = keys[order]
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    mask = np.zeros(len(keys), dtype=bool)
    mask[order[first]] = True
    return mask


# --------------------------------------------------------------------------- the join


def raw_context(
    task: np.ndarray,
    user: np.ndarray,
    query: np.ndarray,
    country: np.ndarray,
    source: np.ndarray,
    catalogue: Catalogue | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, query, country, source) of logged contexts with the imputation's placeholders
    mapped back to ``""`` (the module docstring's rule)."""
    user = np.where(user == UNKNOWN_USER, "", user)
    country = np.where(country == UNKNOWN_COUNTRY, "", country)
    source = np.where(source == NULL_SOURCE, "", source)
    page = (task == Task.MORE_LIKE_THIS.value) | (task == Task.ENTITY.value)
    imputed = page.copy()
    if catalogue is not None:
        names = {s: catalogue.name_of(s) for s in np.unique(source[page]).tolist()}
        imputed_query = np.array(
            [normalise_query(names[s]) if names[s] is not None else "" for s in source[page]],
            dtype=str,
        )
        imputed[page] = query[page] == imputed_query
    query = np.where(imputed | (task == Task.PREQUERY.value), "", query)
    return user, query, country, source


def load_events(
    directory: Path,
    *,
    catalogue: Catalogue | None = None,
    positive_types: Iterable[str] = POSITIVE_TYPES,
    max_delay_s: float = MAX_DELAY_S,
    examined_margin: int | None = EXAMINED_MARGIN,
    unengaged_depth: int | None = UNENGAGED_DEPTH,
) -> tuple[EngagementLog, EventJoinReport]:
    """Join the impressions and engagements in ``directory`` into the unified log.

    ``catalogue``: when given, rows whose entity is not in it and pages whose source is
    not in it are dropped and counted, and a page query that is not the imputed one is
    kept as typed. Raises ``FileNotFoundError`` when ``directory`` holds no impressions
    file, ``ValueError`` naming the file for one that cannot be read or lacks a column."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: events directory does not exist")
    imp_files = _files(directory, IMPRESSIONS_GLOB)
    eng_files = _files(directory, ENGAGEMENTS_GLOB)
    if not imp_files:
        raise FileNotFoundError(f"{directory}: no {IMPRESSIONS_GLOB} files")
    for name, value in (("examined_margin", examined_margin), ("unengaged_depth", unengaged_depth)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    if not max_delay_s > 0:
        raise ValueError(f"max_delay_s must be > 0, got {max_delay_s}")
    positive = sorted(set(positive_types))
    report = EventJoinReport(impression_files=len(imp_files), engagement_files=len(eng_files))

    # --- impressions
    imps = _read(imp_files, IMPRESSION_COLUMNS)
    rid, ts, task = _strings(imps, "request_id"), _floats(imps, "ts"), _strings(imps, "task")
    lengths, shown = _lists(imps, "entity_ids")
    report.impressions_read = len(rid)
    keep = first_of_each(rid, np.nan_to_num(ts, nan=np.inf))
    report.impressions_duplicate = int(np.sum(~keep))
    user, query, country, source = raw_context(
        task,
        _strings(imps, "user"),
        _strings(imps, "query"),
        _strings(imps, "country"),
        _strings(imps, "source_entity_id"),
        catalogue,
    )
    page = (task == Task.MORE_LIKE_THIS.value) | (task == Task.ENTITY.value)
    valid = (
        (rid != "")
        & np.isfinite(ts)
        & np.isin(task, TASKS)
        & ((task != Task.SEARCH.value) | (np.char.str_len(query) > 0))
        & (~page | (source != ""))
    )
    report.impressions_invalid = int(np.sum(keep & ~valid))
    keep &= valid
    if catalogue is not None:
        known_source = ~page | (catalogue.lookup(source) >= 0)
        report.impressions_unknown_source = int(np.sum(keep & ~known_source))
        keep &= known_source
    hashed = _bools(imps, "user_hashed") & (user != "")
    report.impressions_hashed_user = int(np.sum(keep & hashed))

    # Rows: one per (kept impression, shown entity), the first place of a repeated entity.
    row_imp = np.repeat(np.arange(len(rid)), lengths)
    row_pos = np.arange(len(shown)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    kept_rows = keep[row_imp] & (shown != "")
    row_imp, row_pos, row_entity = row_imp[kept_rows], row_pos[kept_rows], shown[kept_rows]
    entity_codes, entity_code = np.unique(row_entity, return_inverse=True)
    entity_code = entity_code.reshape(-1)
    n_codes = max(len(entity_codes), 1)
    row_key = row_imp.astype(np.int64) * n_codes + entity_code
    first_place = first_of_each(row_key, row_pos.astype(np.float64))
    report.shown_repeated = int(np.sum(~first_place))
    row_imp, row_pos, row_entity, row_key = (
        a[first_place] for a in (row_imp, row_pos, row_entity, row_key)
    )
    report.shown_rows = len(row_key)

    # --- engagements
    engs = _read(eng_files, ENGAGEMENT_COLUMNS)
    e_id, e_rid = _strings(engs, "event_id"), _strings(engs, "request_id")
    e_entity, e_type = _strings(engs, "entity_id"), _strings(engs, "type")
    e_ts, e_received = _floats(engs, "ts"), _floats(engs, "received_ts")
    report.engagements_read = len(e_id)
    # Empty event ids cannot be told apart: each counts as its own event.
    used = np.ones(len(e_id), dtype=bool)
    named = e_id != ""
    used[named] = first_of_each(e_id[named], np.nan_to_num(e_received[named], nan=np.inf))
    report.engagements_duplicate = int(np.sum(~used))
    is_positive = np.isin(e_type, positive)
    unknown = used & ~is_positive
    report.engagements_unknown_type = int(np.sum(unknown))
    names, counts = np.unique(e_type[unknown], return_counts=True)
    report.unknown_types = {str(n): int(c) for n, c in zip(names, counts, strict=True)}
    used &= is_positive

    # Orphans: the engagement's request id among the kept impressions.
    kept_imp = np.flatnonzero(keep)
    by_rid = kept_imp[np.argsort(rid[kept_imp], kind="stable")]
    at = np.clip(np.searchsorted(rid[by_rid], e_rid), 0, max(len(by_rid) - 1, 0))
    found = (rid[by_rid[at]] == e_rid) if len(by_rid) else np.zeros(len(e_rid), dtype=bool)
    report.engagements_orphan = int(np.sum(used & ~found))
    used &= found
    e_imp = np.where(found, by_rid[at] if len(by_rid) else 0, -1)

    # Unshown: the (impression, entity) pair among the shown rows.
    code_at = np.clip(np.searchsorted(entity_codes, e_entity), 0, max(len(entity_codes) - 1, 0))
    known_entity = (
        entity_codes[code_at] == e_entity if len(entity_codes) else np.zeros(len(e_id), bool)
    )
    e_key = np.where(known_entity & (e_imp >= 0), e_imp.astype(np.int64) * n_codes + code_at, -1)
    by_key = np.argsort(row_key, kind="stable")
    sorted_keys = row_key[by_key]
    at = np.clip(np.searchsorted(sorted_keys, e_key), 0, max(len(by_key) - 1, 0))
    shown_pair = (e_key >= 0) & (sorted_keys[at] == e_key if len(by_key) else False)
    report.engagements_unshown = int(np.sum(used & ~shown_pair))
    used &= shown_pair
    e_row = np.where(shown_pair, by_key[at] if len(by_key) else 0, -1)

    # Late by both clocks; skewed: the client's clock before the impression.
    imp_ts = np.append(ts, np.nan)[e_imp]  # NaN for orphans (e_imp -1)
    delay = np.fmin(e_ts, e_received) - imp_ts
    late = used & (delay > max_delay_s)
    report.engagements_late = int(np.sum(late))
    used &= ~late
    report.engagements_used = int(np.sum(used))
    report.engagements_skewed = int(np.sum(used & (e_ts < imp_ts)))

    label = np.zeros(len(row_key), dtype=np.int8)
    label[e_row[used]] = 1

    # --- position rule (cascade), on everything shown, before the catalogue filter: an
    # engaged entity missing from the catalogue was still examined by the member.
    lowest = np.full(len(rid), -1, dtype=np.int64)
    np.maximum.at(lowest, row_imp[label == 1], row_pos[label == 1])
    engaged = lowest[row_imp] >= 0
    depth = np.where(
        engaged,
        lowest[row_imp] + (np.inf if examined_margin is None else examined_margin),
        (np.inf if unengaged_depth is None else unengaged_depth) - 1,
    )
    examined = row_pos <= depth
    report.rows_dropped_by_position = int(np.sum(~examined))
    report.impressions_engaged = int(np.sum(lowest[keep] >= 0))

    if catalogue is not None:
        in_catalogue = catalogue.lookup(row_entity) >= 0
        report.rows_unknown_entity = int(np.sum(examined & ~in_catalogue))
        report.positives_unknown_entity = int(np.sum(examined & ~in_catalogue & (label == 1)))
        examined &= in_catalogue
    report.impressions_used = int(np.sum(keep))

    # --- the log, by impression time, then request id, then position
    rows = np.flatnonzero(examined)
    imp = row_imp[rows]
    rows = rows[np.lexsort((row_pos[rows], rid[imp], ts[imp]))]
    imp = row_imp[rows]
    ids = stable_impression_ids(rid[kept_imp].tolist())
    if len(np.unique(ids)) != len(ids):
        raise ValueError("two request ids hash to the same impression id")
    impression_id = np.zeros(len(rid), dtype=np.int64)
    impression_id[kept_imp] = ids
    log = EngagementLog.from_columns(
        {
            "impression_id": impression_id[imp],
            "timestamp": ts[imp].astype(np.int64),  # int(ts)
            "task": task[imp],
            "user_id": user[imp],
            "query": query[imp],
            "country": country[imp],
            "source_entity_id": source[imp],
            "target_entity_id": row_entity[rows],
            "label": label[rows],
        }
    )
    report.position = row_pos[rows].astype(np.int32)
    report.rows, report.positives = len(log), int(log.label.sum())
    engaged_pos = report.position[log.label == 1]
    buckets = np.bincount(np.minimum(engaged_pos, POSITION_BUCKETS), minlength=POSITION_BUCKETS + 1)
    report.positives_by_position = tuple(int(b) for b in buckets)
    return log, report


# --------------------------------------------------------------------------- the source


def catalogue_from(path: Path) -> Catalogue:
    """The catalogue of a bundle directory (its ``catalogue.npz``), or of a catalogue file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--catalogue-from {path}: no such bundle or catalogue file")
    return Catalogue.load(path / CATALOGUE_FILE if path.is_dir() else path)


def load_events_source(
    path: Path | None, catalogue_path: Path | None
) -> tuple[Catalogue, EngagementLog, EventJoinReport]:
    """The ``events`` source of ``unicorn data`` / ``build-bundle``: the catalogue of an
    existing bundle, and the log joined from the events in ``path``."""
    if path is None:
        raise ValueError("--path is required for source events")
    if catalogue_path is None:
        raise ValueError("--catalogue-from is required for source events")
    catalogue = catalogue_from(catalogue_path)
    log, report = load_events(Path(path), catalogue=catalogue)
    return catalogue, log, report
