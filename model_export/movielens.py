"""MovieLens-format files -> the catalogue and the unified engagement log.

Reads a MovieLens directory (``movies.csv``, ``ratings.csv``, ``tags.csv``, as in
``ml-latest-small``; see its README) and derives engagements for all four tasks, so that
the UniCoRn ranker can be trained and evaluated on real data instead of the synthetic
world. Every derivation is documented in ``docs/DATA.md`` (section "MovieLens"); the
short version:

- prequery: every rating >= 4.0 is a positive with sampled non-rated negatives; lower
  ratings are explicit label-0 rows of the nearest-in-time positive's impression;
- more_like_this: consecutive positives of a user, source -> next;
- entity: a genre page -> a positively rated movie of that genre;
- search: mostly titles (a member types the start of a name, stops when it has typed
  enough, sometimes with one typo), the rest user tags; typed keystroke by keystroke, one
  impression per prefix.

Usage::

    from model_export.movielens import load_movielens
    catalogue, log, report = load_movielens(Path("../shared/datasets/ml-latest-small"))
    print(report.as_dict())

Deterministic: the same files, seed and config give identical arrays.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from app.core.catalogue import Catalogue
from app.core.context import TASKS, normalise_query, tokenize
from model_export.engagement_log import EngagementLog

MOVIES_FILE = "movies.csv"
RATINGS_FILE = "ratings.csv"
TAGS_FILE = "tags.csv"
MOVIES_COLUMNS: tuple[str, ...] = ("movieId", "title", "genres")
RATINGS_COLUMNS: tuple[str, ...] = ("userId", "movieId", "rating", "timestamp")
TAGS_COLUMNS: tuple[str, ...] = ("userId", "movieId", "tag", "timestamp")
NO_GENRES = "(no genres listed)"
MIN_RATING, MAX_RATING = 0.5, 5.0

# MovieLens files sort titles by moving a leading article to the end ("Matrix, The");
# these are the articles it moves, in every language the catalogue uses.
TRAILING_ARTICLES: tuple[str, ...] = (
    "The", "A", "An",
    "Le", "La", "Les", "L'", "Un", "Une",
    "Il", "Lo", "I", "Gli", "Una", "Uno",
    "El", "Los", "Las",
    "Der", "Die", "Das",
    "Den", "Det", "En", "Ett", "De",
    "Da",
)  # fmt: skip
_ARTICLE_ALTERNATIVES = "|".join(re.escape(a) for a in TRAILING_ARTICLES)
_ARTICLE = re.compile(rf"^(?P<body>.+?),\s*(?P<article>{_ARTICLE_ALTERNATIVES})$")
# A year, or a year range of a series ("(2006–2007)"), at the very end of the title.
_YEAR = re.compile(r"\s*\((?P<year>\d{4})(?:\s*[-–]\s*(?:\d{4})?)?\)\s*$")
_ALTERNATE = re.compile(r"\s*\((?P<alt>[^()]*)\)\s*$")
_INT = re.compile(r"-?\d+")
# A word for "typed from the second word": punctuation like "&" or "-" is not one.
_WORD = re.compile(r"\S*\w\S*")
_DECIMAL = re.compile(r"\d+(?:\.\d+)?")
# Sampler work is done in blocks of impressions to bound the temporary (rows x draws x
# blocked) comparison arrays to a few tens of MB.
_SAMPLE_BLOCK = 8192


class MovieLensError(ValueError):
    """A MovieLens file is missing, lacks a column, or has a malformed row."""


@dataclass(frozen=True)
class MovieLensConfig:
    """The knobs of the derivation; the defaults give ~1M log rows on ml-latest-small.

    ``negatives``: sampled (or, for search, matched) negatives per impression.
    ``positive_threshold``: a rating at or above it is a positive engagement.
    ``mlt_pairs_per_user``: at most this many more_like_this pairs per user.
    ``entity_fraction``: share of positives that also produce an entity impression.
    ``title_query_fraction``: share of positives that produce a title-search session
    (0.4 makes ~74% of search impressions title queries on ml-latest-small; the rest are
    tag sessions, which are all kept).
    ``second_word_fraction``: share of title sessions typed from the title's second word.
    ``title_stop_exponent``: a title session types ``2 + floor(u**e * (n - 1))`` of the
    ``n`` characters (u uniform): 1 = uniform, larger = members stop earlier.
    ``typo_fraction``: share of title sessions with one typo (transposition, missing or
    doubled letter, dropped accent).
    ``max_tag_prefix`` / ``max_title_prefix``: the longest prefix typed, in characters.
    ``popularity_exponent``: negatives are sampled with probability ~ popularity**this.
    """

    negatives: int = 7
    positive_threshold: float = 4.0
    mlt_pairs_per_user: int = 50
    entity_fraction: float = 0.3
    title_query_fraction: float = 0.4
    second_word_fraction: float = 0.3
    title_stop_exponent: float = 2.0
    typo_fraction: float = 0.1
    max_tag_prefix: int = 20
    max_title_prefix: int = 24
    popularity_exponent: float = 0.5

    def __post_init__(self) -> None:
        if self.negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {self.negatives}")
        if not MIN_RATING <= self.positive_threshold <= MAX_RATING:
            raise ValueError(
                f"positive_threshold must be in [{MIN_RATING}, {MAX_RATING}], "
                f"got {self.positive_threshold}"
            )
        if self.mlt_pairs_per_user < 0:
            raise ValueError(f"mlt_pairs_per_user must be >= 0, got {self.mlt_pairs_per_user}")
        for name in (
            "entity_fraction",
            "title_query_fraction",
            "second_word_fraction",
            "typo_fraction",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name in ("max_tag_prefix", "max_title_prefix"):
            value = getattr(self, name)
            if value < 2:
                raise ValueError(f"{name} must be >= 2, got {value}")
        if self.popularity_exponent < 0:
            raise ValueError(f"popularity_exponent must be >= 0, got {self.popularity_exponent}")
        if not self.title_stop_exponent > 0:
            raise ValueError(f"title_stop_exponent must be > 0, got {self.title_stop_exponent}")


@dataclass(frozen=True)
class LoadReport:
    """What was read, what was dropped (and why), and what was produced."""

    movies_read: int
    ratings_read: int
    tags_read: int
    genres: int
    users: int
    ratings_unknown_movie: int  # dropped: movieId not in movies.csv
    tags_unknown_movie: int  # dropped: movieId not in movies.csv
    tags_unusable: int  # dropped: no prefix of >= 2 characters survives normalisation
    title_queries_too_short: int  # sampled titles whose typed text has < 2 usable chars
    low_ratings_without_positive: int  # label-0 rows of users with no positive at all
    # Search sessions that logged at least one impression, and their impressions, by what
    # was typed; typo impressions are those whose prefix already holds the typo.
    tag_sessions: int
    title_sessions: int
    typo_sessions: int  # title sessions with a typo (a subset of title_sessions)
    tag_search_impressions: int
    title_search_impressions: int
    typo_search_impressions: int  # a subset of title_search_impressions
    impressions_per_task: Mapping[str, int] = field(default_factory=dict)
    rows_per_task: Mapping[str, int] = field(default_factory=dict)
    positives_per_task: Mapping[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready counts (for a bundle manifest's training data summary)."""
        out = asdict(self)
        for name in ("impressions_per_task", "rows_per_task", "positives_per_task"):
            out[name] = dict(getattr(self, name))
        return out


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _CsvColumns:
    """The required columns of one CSV file, as strings, with each row's line number."""

    path: Path
    lines: list[int]
    values: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.lines)

    def ints(self, column: str) -> np.ndarray:
        values = self.values[column]
        for i, value in enumerate(values):
            if not _INT.fullmatch(value):
                raise MovieLensError(
                    f"{self.path}: line {self.lines[i]}: column {column!r} must be an "
                    f"integer, got {value!r}"
                )
        return np.array(values, dtype=np.int64)

    def ratings(self, column: str) -> np.ndarray:
        values = self.values[column]
        for i, value in enumerate(values):
            if not _DECIMAL.fullmatch(value) or not MIN_RATING <= float(value) <= MAX_RATING:
                raise MovieLensError(
                    f"{self.path}: line {self.lines[i]}: column {column!r} must be a "
                    f"number in [{MIN_RATING}, {MAX_RATING}], got {value!r}"
                )
        return np.array(values, dtype=np.float64)


def _read_csv(path: Path, required: tuple[str, ...]) -> _CsvColumns:
    """Read ``path``; every row must have exactly the header's number of fields."""
    if not path.is_file():
        raise MovieLensError(
            f"{path}: file does not exist (a MovieLens directory needs "
            f"{MOVIES_FILE}, {RATINGS_FILE} and {TAGS_FILE})"
        )
    lines: list[int] = []
    rows: list[list[str]] = []
    try:
        # utf-8-sig: a byte-order mark would otherwise become part of the first column name.
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise MovieLensError(f"{path}: file is empty (expected a header {required})")
            missing = [name for name in required if name not in header]
            if missing:
                raise MovieLensError(
                    f"{path}: missing required column(s) {missing} (header is {header})"
                )
            width = len(header)
            for row in reader:
                if not row:  # blank line, e.g. a trailing newline
                    continue
                if len(row) != width:
                    raise MovieLensError(_field_count_message(path, reader.line_num, header, row))
                lines.append(reader.line_num)
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise MovieLensError(f"{path}: not valid UTF-8 ({exc})") from exc
    except csv.Error as exc:
        raise MovieLensError(f"{path}: CSV syntax error ({exc})") from exc
    positions = {name: header.index(name) for name in required}
    values = {name: [row[pos] for row in rows] for name, pos in positions.items()}
    return _CsvColumns(path=path, lines=lines, values=values)


def _field_count_message(path: Path, line: int, header: list[str], row: list[str]) -> str:
    if len(row) < len(header):
        return (
            f"{path}: line {line}: column {header[len(row)]!r} is missing "
            f"(expected {len(header)} fields {header}, got {len(row)})"
        )
    return (
        f"{path}: line {line}: unexpected extra field after column {header[-1]!r} "
        f"(expected {len(header)} fields {header}, got {len(row)})"
    )


# ------------------------------------------------------------------------ catalogue


def split_title(title: str) -> tuple[str, str, int]:
    """``(display_name, typed_name, year)`` of a MovieLens title.

    The trailing "(year)" (or "(first–last)" of a series) becomes ``year`` (0 when
    absent). Alternate titles in trailing parentheses stay in the display name, but each
    part gets its moved article back in front: "City of Lost Children, The (Cité des
    enfants perdus, La) (1995)" -> "The City of Lost Children (La Cité des enfants
    perdus)". ``typed_name`` is the first part only: what a member types to find it.
    """
    text = title.strip()
    year = 0
    match = _YEAR.search(text)
    if match and match.start() > 0:
        year = int(match.group("year"))
        text = text[: match.start()].rstrip()
    alternates: list[str] = []
    while (match := _ALTERNATE.search(text)) and match.start() > 0:
        alternates.insert(0, _front_article(match.group("alt")))
        text = text[: match.start()].rstrip()
    typed = _front_article(text)
    display = " ".join([typed, *(f"({alt})" for alt in alternates if alt)])
    return display, typed, year


def _front_article(part: str) -> str:
    part = part.strip()
    match = _ARTICLE.match(part)
    if not match:
        return part
    article, body = match.group("article"), match.group("body").strip()
    # "L'" binds to its word without a space: "Ours, L'" -> "L'Ours".
    return f"{article}{body}" if article.endswith("'") else f"{article} {body}"


@dataclass(frozen=True)
class _Movies:
    movie_ids: np.ndarray  # (M,) int64, file order
    display: list[str]
    typed: list[str]
    years: np.ndarray  # (M,) int32
    genres: list[list[str]]
    genre_names: list[str]  # sorted


def _parse_movies(table: _CsvColumns) -> _Movies:
    movie_ids = table.ints("movieId")
    seen: dict[int, int] = {}
    for i, mid in enumerate(movie_ids.tolist()):
        if mid in seen:
            raise MovieLensError(
                f"{table.path}: line {table.lines[i]}: column 'movieId' repeats {mid} "
                f"(first on line {seen[mid]})"
            )
        seen[mid] = table.lines[i]
    display: list[str] = []
    typed: list[str] = []
    years: list[int] = []
    genres: list[list[str]] = []
    for i, (title, genre_text) in enumerate(
        zip(table.values["title"], table.values["genres"], strict=True)
    ):
        name, typed_name, year = split_title(title)
        if not normalise_query(name):
            # A nameless video could never be searched for, and would impute an empty query.
            raise MovieLensError(
                f"{table.path}: line {table.lines[i]}: column 'title' has no name, got {title!r}"
            )
        display.append(name)
        typed.append(typed_name)
        years.append(year)
        names = [] if genre_text.strip() == NO_GENRES else genre_text.split("|")
        genres.append([g.strip() for g in names if g.strip()])
    genre_names = sorted({g for gs in genres for g in gs})
    return _Movies(
        movie_ids=movie_ids,
        display=display,
        typed=typed,
        years=np.array(years, dtype=np.int32),
        genres=genres,
        genre_names=genre_names,
    )


def _build_catalogue(movies: _Movies) -> Catalogue:
    """Movies first (catalogue index = movie row), then one entity per genre."""
    movie_ids = [f"m{mid}" for mid in movies.movie_ids.tolist()]
    genre_ids = [f"genre:{g}" for g in movies.genre_names]
    n_movies, n_genres = len(movie_ids), len(genre_ids)
    link_source = [f"genre:{g}" for gs in movies.genres for g in gs]
    link_target = [movie_ids[i] for i, gs in enumerate(movies.genres) for _ in gs]
    return Catalogue(
        entity_id=np.array(movie_ids + genre_ids, dtype=str),
        entity_type=np.array(["video"] * n_movies + ["genre"] * n_genres, dtype=str),
        display_name=np.array(movies.display + movies.genre_names, dtype=str),
        year=np.concatenate([movies.years, np.zeros(n_genres, dtype=np.int32)]),
        genres=np.array(["|".join(gs) for gs in movies.genres] + [""] * n_genres, dtype=str),
        # MovieLens has no countries; "" means "available everywhere", never invented.
        countries=np.array([""] * (n_movies + n_genres), dtype=str),
        link_source=np.array(link_source, dtype=str),
        link_target=np.array(link_target, dtype=str),
    )


# ------------------------------------------------------------------------- sampling


def _fill_negatives(
    rng: np.random.Generator,
    weights: np.ndarray,
    out: np.ndarray,
    groups: np.ndarray,
    excluded_keys: np.ndarray,
    blocked: np.ndarray,
) -> None:
    """Fill the ``-1`` slots of ``out`` (R, n) in place, left-packed rows.

    Each row draws items without replacement with probability proportional to
    ``weights`` (M,), skipping items already in the row, items of ``blocked`` (R, k;
    -1 = padding) and items whose key ``group * M + item`` is in the sorted
    ``excluded_keys`` (``groups`` (R,) is e.g. the user, the keys their rated movies).

    Drawing i.i.d. and discarding repeats and excluded items is exactly sequential
    sampling without replacement from the renormalised distribution, so the result is
    the same as ``rng.choice(..., replace=False, p=...)`` per row, but vectorised. Rows
    that are still short after a few rounds (a heavy rater who rated most of the weight)
    finish with an exact per-row draw; a row keeps ``-1`` only when no allowed item with
    positive weight is left.
    """
    n_items = len(weights)
    if out.size == 0 or n_items == 0:
        return
    cdf = np.cumsum(weights, dtype=np.float64)
    total = float(cdf[-1])
    if total <= 0.0:
        return
    for start in range(0, len(out), _SAMPLE_BLOCK):
        rows = np.arange(start, min(start + _SAMPLE_BLOCK, len(out)))
        draws = 3 * out.shape[1] + 8
        for _ in range(3):
            rows = rows[(out[rows] < 0).any(axis=1)]
            if rows.size == 0:
                break
            candidates = np.searchsorted(cdf, rng.random((rows.size, draws)) * total, side="right")
            np.minimum(candidates, n_items - 1, out=candidates)  # float round-off at 1.0
            ok = ~_is_excluded(groups[rows], candidates, excluded_keys, n_items)
            taken = np.concatenate([out[rows], blocked[rows]], axis=1)  # (P, n + k)
            ok &= ~(candidates[:, :, None] == taken[:, None, :]).any(axis=2)
            ok &= ~_later_duplicates(candidates)
            filled = (out[rows] >= 0).sum(axis=1)
            need = out.shape[1] - filled
            rank = np.cumsum(ok, axis=1)
            use = ok & (rank <= need[:, None])
            r, c = np.nonzero(use)
            out[rows[r], filled[r] + rank[r, c] - 1] = candidates[r, c]
            draws *= 4
        for row in rows[(out[rows] < 0).any(axis=1)].tolist():
            _fill_row_exactly(rng, weights, out, row, groups[row], excluded_keys, blocked)


def _is_excluded(
    groups: np.ndarray, candidates: np.ndarray, excluded_keys: np.ndarray, n_items: int
) -> np.ndarray:
    if excluded_keys.size == 0:
        return np.zeros(candidates.shape, dtype=bool)
    keys = groups[:, None] * n_items + candidates
    pos = np.minimum(np.searchsorted(excluded_keys, keys), excluded_keys.size - 1)
    return np.asarray(excluded_keys[pos] == keys)


def _later_duplicates(candidates: np.ndarray) -> np.ndarray:
    """(P, D) bool: the value already occurred earlier in its row."""
    order = np.argsort(candidates, axis=1, kind="stable")
    ordered = np.take_along_axis(candidates, order, axis=1)
    dup_sorted = np.zeros(candidates.shape, dtype=bool)
    dup_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    dup = np.zeros(candidates.shape, dtype=bool)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    return dup


def _fill_row_exactly(
    rng: np.random.Generator,
    weights: np.ndarray,
    out: np.ndarray,
    row: int,
    group: int,
    excluded_keys: np.ndarray,
    blocked: np.ndarray,
) -> None:
    n_items = len(weights)
    allowed = weights > 0
    lo, hi = np.searchsorted(excluded_keys, [group * n_items, (group + 1) * n_items])
    allowed[excluded_keys[lo:hi] - group * n_items] = False
    taken = np.concatenate([out[row], blocked[row]])
    allowed[taken[taken >= 0]] = False
    filled = int((out[row] >= 0).sum())
    pool = np.flatnonzero(allowed)
    k = min(out.shape[1] - filled, pool.size)
    if k == 0:
        return
    p = weights[pool] / weights[pool].sum()
    out[row, filled : filled + k] = rng.choice(pool, size=k, replace=False, p=p)


# ----------------------------------------------------------------------- search typos

# The typos of a title session (docs/DATA.md, MovieLens, search).
TYPO_KINDS: tuple[str, ...] = ("transposition", "missing", "doubled", "accent")
_DIACRITIC = re.compile("[\u0300-\u036f]")


def _strip_accents(char: str) -> str:
    """``char`` without its accents, the combining diacritical marks U+0300-U+036F ("é" ->
    "e"); unchanged when it has none. Other combining marks spell letters (a Devanagari
    virama, a Japanese dakuten): leaving one out is not dropping an accent."""
    decomposed = unicodedata.normalize("NFD", char)
    return unicodedata.normalize("NFC", _DIACRITIC.sub("", decomposed))


def typo_variants(text: str, stop: int, cap: int) -> dict[str, list[str]]:
    """Every one-typo version of ``text[:stop]``, by kind (``TYPO_KINDS``).

    transposition: two adjacent different letters after the first swapped ("Teh");
    missing: a letter after the first left out ("Te Matrix"); doubled: a letter after the
    first typed twice ("Thhe"); accent: an accent dropped ("Amelie"). A variant must hold
    >= 2 characters, at most ``cap``, and must not normalise to a prefix of ``text`` from
    one of its words (dropping one "o" of "Too" types "To"; "Str" for "Star Wars: ... The
    Empire Strikes Back" types a word of it: no typo). So a dropped accent is a typo only
    while ``normalise_query`` keeps accents; now that it folds them ("Amelie" is
    "Amélie"), no accent variant is left. Variants may repeat.
    """
    typed = text[:stop]
    whole = normalise_query(text)
    from_words = [whole[i:] for i in range(len(whole)) if i == 0 or whole[i - 1] == " "]
    out: dict[str, list[str]] = {kind: [] for kind in TYPO_KINDS}
    for p, char in enumerate(typed):
        if not char.isalnum():
            continue
        after = typed[p + 1 : p + 2]
        candidates: list[tuple[str, str]] = []
        if p >= 1 and after.isalnum() and char.casefold() != after.casefold():
            candidates.append(("transposition", typed[:p] + after + char + typed[p + 2 :]))
        if p >= 1 and len(typed) >= 3:
            candidates.append(("missing", typed[:p] + typed[p + 1 :]))
        if p >= 1 and p + 2 <= cap:
            candidates.append(("doubled", (typed[: p + 1] + typed[p:])[:cap]))
        bare = _strip_accents(char)
        if bare and bare != char:
            candidates.append(("accent", typed[:p] + bare + typed[p + 1 :]))
        for kind, variant in candidates:
            norm = normalise_query(variant)
            if len(variant) >= 2 and norm and not any(w.startswith(norm) for w in from_words):
                out[kind].append(variant)
    return out


def _typo(rng: np.random.Generator, text: str, stop: int, cap: int) -> tuple[str, int] | None:
    """``text[:stop]`` with one typo and the index of its first changed character.

    A typed accented letter loses its accent, when that is a typo (most keyboards make it
    the likeliest slip); otherwise the kind is drawn uniformly among the possible ones.
    Then the variant is drawn uniformly. ``None`` when no typo fits (every variant types
    another prefix).
    """
    variants = typo_variants(text, stop, cap)
    kinds = ["accent"] if variants["accent"] else [k for k in TYPO_KINDS if variants[k]]
    if not kinds:
        return None
    options = variants[kinds[int(rng.integers(len(kinds)))]]
    typo = options[int(rng.integers(len(options)))]
    intended = text[:stop]
    at = next(
        (i for i, (a, b) in enumerate(zip(typo, intended, strict=False)) if a != b),
        min(len(typo), len(intended)),
    )
    return typo, at


@dataclass
class _Session:
    """One search session: what was typed (already cut where the member stopped)."""

    user: int
    movie: int
    text: str
    timestamp: int
    cap: int  # the longest prefix logged
    intended: str = ""  # a typo session: what the member meant to type
    typo_at: int = -1  # a typo session: index of the first character that differs


@dataclass
class _SearchCounts:
    """What ``_Derivation.search`` reports (``LoadReport``)."""

    unusable_tags: int = 0
    short_titles: int = 0
    tag_sessions: int = 0
    title_sessions: int = 0
    typo_sessions: int = 0
    tag_impressions: int = 0
    title_impressions: int = 0
    typo_impressions: int = 0


# -------------------------------------------------------------------- log assembly


@dataclass
class _Block:
    """One task's impressions (context per impression) and rows (target, label)."""

    task: str
    timestamp: np.ndarray  # (I,) int64
    user: np.ndarray  # (I,) int64 index into the user table
    source: np.ndarray  # (I,) int64 catalogue index, -1 = none
    query: np.ndarray  # (I,) str
    row_impression: np.ndarray  # (R,) int64 index into this block's impressions
    row_target: np.ndarray  # (R,) int64 catalogue index
    row_label: np.ndarray  # (R,) int8


def _rows_from_matrix(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows of impressions ``i``: target ``positives[i]`` (label 1) + ``negatives[i]``."""
    targets = np.concatenate([positives[:, None], negatives], axis=1)
    labels = np.zeros(targets.shape, dtype=np.int8)
    labels[:, 0] = 1
    impressions = np.broadcast_to(np.arange(len(targets))[:, None], targets.shape)
    keep = targets >= 0
    return impressions[keep].astype(np.int64), targets[keep], labels[keep]


@dataclass(frozen=True)
class _Ratings:
    """Known-movie ratings sorted by (user, timestamp, movie)."""

    user: np.ndarray  # (N,) int64 index into users
    movie: np.ndarray  # (N,) int64 catalogue index
    rating: np.ndarray  # (N,) float64
    timestamp: np.ndarray  # (N,) int64


class _Derivation:
    """Holds the shared lookups while the four tasks are derived."""

    def __init__(
        self,
        movies: _Movies,
        ratings: _Ratings,
        engaged_keys: np.ndarray,
        config: MovieLensConfig,
    ) -> None:
        self.movies = movies
        self.ratings = ratings
        self.engaged_keys = engaged_keys
        self.config = config
        self.n_movies = len(movies.movie_ids)
        self.popularity = np.bincount(ratings.movie, minlength=self.n_movies)
        self.weights = self.popularity.astype(np.float64) ** config.popularity_exponent
        self.weights[self.popularity == 0] = 0.0  # 0**0 == 1: unrated movies never shown
        self.positive = ratings.rating >= config.positive_threshold

    def _sampled(
        self, rng: np.random.Generator, users: np.ndarray, targets: np.ndarray
    ) -> np.ndarray:
        negatives = np.full((len(users), self.config.negatives), -1, dtype=np.int64)
        _fill_negatives(rng, self.weights, negatives, users, self.engaged_keys, targets[:, None])
        return negatives

    def prequery(self, rng: np.random.Generator) -> tuple[_Block, int]:
        r = self.ratings
        pos = np.flatnonzero(self.positive)
        negatives = self._sampled(rng, r.user[pos], r.movie[pos])
        row_imp, row_target, row_label = _rows_from_matrix(r.movie[pos], negatives)
        # A low rating is an explicit negative: it joins the impression of the same user's
        # nearest-in-time positive, so it competes with a title the user did like. A user
        # with no positive at all gets one impression per low rating, holding just it.
        low = np.flatnonzero(~self.positive)
        imp_of_low = self._nearest_positive(pos, low)
        orphans = low[imp_of_low < 0]
        imp_of_low[imp_of_low < 0] = len(pos) + np.arange(len(orphans))
        impression_rating = np.concatenate([pos, orphans])
        block = _Block(
            task="prequery",
            timestamp=r.timestamp[impression_rating],
            user=r.user[impression_rating],
            source=np.full(len(impression_rating), -1, dtype=np.int64),
            query=np.full(len(impression_rating), "", dtype=str),
            row_impression=np.concatenate([row_imp, imp_of_low]),
            row_target=np.concatenate([row_target, r.movie[low]]),
            row_label=np.concatenate([row_label, np.zeros(len(low), dtype=np.int8)]),
        )
        return block, len(orphans)

    def _nearest_positive(self, pos: np.ndarray, low: np.ndarray) -> np.ndarray:
        """For each rating index in ``low``: the index into ``pos`` of the same user's
        nearest-in-time positive, -1 when the user has none."""
        r = self.ratings
        if pos.size == 0:
            return np.full(len(low), -1, dtype=np.int64)
        # Ratings are sorted by (user, time), so a low rating's neighbours in that order
        # among the positives are its user's nearest-in-time positives, if same user.
        after = np.searchsorted(pos, low)
        before = after - 1
        has_after = after < len(pos)
        has_after[has_after] &= r.user[pos[after[has_after]]] == r.user[low[has_after]]
        has_before = before >= 0
        has_before[has_before] &= r.user[pos[before[has_before]]] == r.user[low[has_before]]
        after_c, before_c = np.minimum(after, len(pos) - 1), np.maximum(before, 0)
        gap_after = np.where(has_after, r.timestamp[pos[after_c]] - r.timestamp[low], 0)
        gap_before = np.where(has_before, r.timestamp[low] - r.timestamp[pos[before_c]], 0)
        # Ties go to the earlier positive.
        use_after = has_after & (~has_before | (gap_after < gap_before))
        return np.where(use_after, after, np.where(has_before, before, -1))

    def more_like_this(self, rng: np.random.Generator) -> _Block:
        r = self.ratings
        pos = np.flatnonzero(self.positive)
        cap = self.config.mlt_pairs_per_user
        pairs: list[np.ndarray] = []  # index into pos of each pair's target
        bounds = np.flatnonzero(np.diff(r.user[pos])) + 1
        for user_pos in np.split(np.arange(len(pos)), bounds):
            if len(user_pos) < 2 or cap == 0:
                continue
            nxt = user_pos[1:]
            nxt = nxt[r.movie[pos[nxt]] != r.movie[pos[nxt - 1]]]  # a repeated rating
            if len(nxt) > cap:
                # Evenly spaced over the user's history: the temporal split still sees
                # both their early and their late pairs.
                nxt = nxt[np.unique(np.linspace(0, len(nxt) - 1, cap).round().astype(int))]
            pairs.append(nxt)
        nxt = np.concatenate(pairs) if pairs else np.zeros(0, dtype=np.int64)
        target_rating, source_rating = pos[nxt], pos[nxt - 1]
        negatives = self._sampled(rng, r.user[target_rating], r.movie[target_rating])
        row_imp, row_target, row_label = _rows_from_matrix(r.movie[target_rating], negatives)
        return _Block(
            task="more_like_this",
            timestamp=r.timestamp[target_rating],
            user=r.user[target_rating],
            source=r.movie[source_rating],
            query=np.full(len(nxt), "", dtype=str),
            row_impression=row_imp,
            row_target=row_target,
            row_label=row_label,
        )

    def entity(self, rng: np.random.Generator) -> _Block:
        r = self.ratings
        with_genres = np.array([bool(g) for g in self.movies.genres])
        pos = np.flatnonzero(self.positive & with_genres[r.movie])
        pos = pos[rng.random(len(pos)) < self.config.entity_fraction]
        genre_index = {g: i for i, g in enumerate(self.movies.genre_names)}
        # Each impression's genre page: one of the movie's genres, uniformly at random.
        picks = rng.random(len(pos))
        genre = np.array(
            [
                genre_index[gs[int(u * len(gs))]]
                for gs, u in zip(
                    (self.movies.genres[m] for m in r.movie[pos].tolist()),
                    picks.tolist(),
                    strict=True,
                )
            ],
            dtype=np.int64,
        )
        members = np.zeros((len(self.movies.genre_names), self.n_movies), dtype=bool)
        for m, gs in enumerate(self.movies.genres):
            for g in gs:
                members[genre_index[g], m] = True
        negatives = np.full((len(pos), self.config.negatives), -1, dtype=np.int64)
        users, targets = r.user[pos], r.movie[pos]
        for g in np.unique(genre).tolist():
            rows = np.flatnonzero(genre == g)
            part = negatives[rows]
            _fill_negatives(
                rng,
                self.weights * members[g],
                part,
                users[rows],
                self.engaged_keys,
                targets[rows, None],
            )
            negatives[rows] = part
        # Too few unrated movies in the genre: top up from the whole catalogue.
        short = np.flatnonzero((negatives < 0).any(axis=1))
        part = negatives[short]
        _fill_negatives(
            rng, self.weights, part, users[short], self.engaged_keys, targets[short, None]
        )
        negatives[short] = part
        row_imp, row_target, row_label = _rows_from_matrix(targets, negatives)
        return _Block(
            task="entity",
            timestamp=r.timestamp[pos],
            user=users,
            source=self.n_movies + genre,
            query=np.full(len(pos), "", dtype=str),
            row_impression=row_imp,
            row_target=row_target,
            row_label=row_label,
        )

    def search(
        self,
        rng: np.random.Generator,
        tag_user: np.ndarray,
        tag_movie: np.ndarray,
        tag_text: list[str],
        tag_timestamp: np.ndarray,
    ) -> tuple[_Block, _SearchCounts]:
        """Keystroke sessions from tags, then from titles (docs/DATA.md, MovieLens)."""
        cfg = self.config
        r = self.ratings
        sessions: list[_Session] = [
            _Session(u, m, text, ts, cfg.max_tag_prefix)
            for u, m, text, ts in zip(
                tag_user.tolist(),
                tag_movie.tolist(),
                tag_text,
                tag_timestamp.tolist(),
                strict=True,
            )
        ]
        n_tag_sessions = len(sessions)
        pos = np.flatnonzero(self.positive)
        pos = pos[rng.random(len(pos)) < cfg.title_query_fraction]
        from_second = rng.random(len(pos)) < cfg.second_word_fraction
        stop_draw = rng.random(len(pos)) ** cfg.title_stop_exponent
        with_typo = rng.random(len(pos)) < cfg.typo_fraction
        for i, second, u, typo in zip(
            pos.tolist(), from_second.tolist(), stop_draw.tolist(), with_typo.tolist(), strict=True
        ):
            text = self.movies.typed[int(r.movie[i])]
            words = list(_WORD.finditer(text))
            if second and len(words) >= 2:
                text = text[words[1].start() :]
            # Members stop once they have typed enough: 2..n characters, short stops first.
            n = min(len(text), cfg.max_title_prefix)
            stop = min(2 + int(u * (n - 1)), n)
            if typo:  # a typo needs a letter after the first to act on: type >= 3 of them
                stop = max(stop, min(3, n))
            cap = cfg.max_title_prefix  # text is cut where the member stopped: <= cap
            session = _Session(
                int(r.user[i]), int(r.movie[i]), text[:stop], int(r.timestamp[i]), cap
            )
            made = _typo(rng, text, stop, cap) if typo else None
            if made is not None:
                session.intended = session.text
                session.text, session.typo_at = made
            sessions.append(session)

        index = self._prefix_index()
        last_cache: dict[str, str] = {}  # raw prefix -> last normalised token ("" = none)

        def last_token(prefix: str) -> str:
            last = last_cache.get(prefix)
            if last is None:
                tokens = tokenize(normalise_query(prefix))
                last = last_cache[prefix] = tokens[-1] if tokens else ""
            return last

        imp_user: list[int] = []
        imp_target: list[int] = []
        imp_query: list[str] = []
        imp_ts: list[int] = []
        matched_rows: list[list[int]] = []
        counts = _SearchCounts()
        for s, session in enumerate(sessions):
            is_tag = s < n_tag_sessions
            text, movie = session.text, session.movie
            # Prefix k of a typo'd text stands for prefix k + shift of what was meant.
            shift = len(session.intended) - len(text)
            typed = 0
            for length in range(2, min(len(text), session.cap) + 1):
                prefix = text[:length]
                last = last_token(prefix)
                if not last:  # e.g. "..": the service would refuse it, so it is not logged
                    continue
                has_typo = 0 <= session.typo_at < length
                if has_typo:
                    # The policy corrects typos like the service does: negatives match the
                    # token the member meant, never the typo better than the positive does.
                    last = last_token(session.intended[: length + shift]) or last
                matched = [m for m in index.get(last, ()) if m != movie][: cfg.negatives]
                imp_user.append(session.user)
                imp_target.append(movie)
                imp_query.append(prefix)
                imp_ts.append(session.timestamp + typed)  # keystrokes a second apart
                matched_rows.append(matched)
                typed += 1
                counts.typo_impressions += has_typo
            if typed == 0:
                if is_tag:
                    counts.unusable_tags += 1
                else:
                    counts.short_titles += 1
            elif is_tag:
                counts.tag_sessions += 1
                counts.tag_impressions += typed
            else:
                counts.title_sessions += 1
                counts.title_impressions += typed
                counts.typo_sessions += session.typo_at >= 0

        negatives = np.full((len(imp_target), cfg.negatives), -1, dtype=np.int64)
        for i, matched in enumerate(matched_rows):
            negatives[i, : len(matched)] = matched
        targets = np.array(imp_target, dtype=np.int64)
        # Fewer matches than slots: the naive policy pads with random popular movies.
        short = np.flatnonzero((negatives < 0).any(axis=1))
        part = negatives[short]
        _fill_negatives(
            rng,
            self.weights,
            part,
            np.zeros(len(short), dtype=np.int64),
            np.zeros(0, dtype=np.int64),
            targets[short, None],
        )
        negatives[short] = part
        row_imp, row_target, row_label = _rows_from_matrix(targets, negatives)
        block = _Block(
            task="search",
            timestamp=np.array(imp_ts, dtype=np.int64),
            user=np.array(imp_user, dtype=np.int64),
            source=np.full(len(targets), -1, dtype=np.int64),
            query=np.array(imp_query, dtype=str),
            row_impression=row_imp,
            row_target=row_target,
            row_label=row_label,
        )
        return block, counts

    def _prefix_index(self) -> dict[str, list[int]]:
        """Token prefix -> the ``negatives + 1`` most popular movies with a name token
        starting with it (one extra, in case the target itself is among them)."""
        keep = self.config.negatives + 1
        order = np.lexsort((np.arange(self.n_movies), -self.popularity))
        index: dict[str, list[int]] = {}
        for m in order.tolist():
            seen: set[str] = set()
            for token in tokenize(normalise_query(self.movies.display[m])):
                for length in range(1, len(token) + 1):
                    prefix = token[:length]
                    if prefix in seen:
                        continue
                    seen.add(prefix)
                    hits = index.setdefault(prefix, [])
                    if len(hits) < keep:
                        hits.append(m)
        return index


def _assemble(
    blocks: Sequence[_Block],
    catalogue: Catalogue,
    user_names: np.ndarray,
    rng: np.random.Generator,
) -> EngagementLog:
    """Concatenate the task blocks into one log with unique impression ids."""
    ids_or_empty = np.append(catalogue.entity_id, "")  # index -1 -> ""
    # Rows of an impression in random order: a positive always listed first would let a
    # position-aware consumer (or a stable sort on tied scores) read the label.
    # One stream per block, so that one task's size never reorders another task's rows.
    orders = [
        np.lexsort((block_rng.random(len(b.row_impression)), b.row_impression))
        for b, block_rng in zip(blocks, rng.spawn(len(blocks)), strict=True)
    ]
    imps = [b.row_impression[o] for b, o in zip(blocks, orders, strict=True)]
    offsets = np.cumsum([0] + [len(b.timestamp) for b in blocks])
    parts: dict[str, Callable[[_Block, np.ndarray, np.ndarray], np.ndarray]] = {
        "impression_id": lambda b, imp, _: imp,  # offset added below
        "timestamp": lambda b, imp, _: b.timestamp[imp],
        "task": lambda b, imp, _: np.full(len(imp), b.task),
        "user_id": lambda b, imp, _: user_names[b.user[imp]],
        "query": lambda b, imp, _: b.query[imp],
        "country": lambda b, imp, _: np.full(len(imp), "", dtype=str),
        "source_entity_id": lambda b, imp, _: ids_or_empty[b.source[imp]],
        "target_entity_id": lambda b, imp, order: catalogue.entity_id[b.row_target[order]],
        "label": lambda b, imp, order: b.row_label[order],
    }
    # Column by column, so that only one column's per-block pieces exist next to the log.
    columns = {
        name: np.concatenate(
            [make(b, imp, o) for b, imp, o in zip(blocks, imps, orders, strict=True)]
        )
        for name, make in parts.items()
    }
    columns["impression_id"] += np.repeat(offsets[:-1], [len(i) for i in imps])
    return EngagementLog.from_columns(columns)


# ------------------------------------------------------------------------ the entry


def load_movielens(
    path: Path, seed: int = 7, config: MovieLensConfig | None = None
) -> tuple[Catalogue, EngagementLog, LoadReport]:
    """Read a MovieLens directory; return the catalogue, the unified log and a report.

    Raises ``MovieLensError`` (a ``ValueError``) naming the file for a missing file or
    column, and the file, line and column for a malformed row. Ratings and tags of movie
    ids absent from ``movies.csv`` are dropped and counted in the report.
    """
    cfg = config or MovieLensConfig()
    movies_table = _read_csv(path / MOVIES_FILE, MOVIES_COLUMNS)
    ratings_table = _read_csv(path / RATINGS_FILE, RATINGS_COLUMNS)
    tags_table = _read_csv(path / TAGS_FILE, TAGS_COLUMNS)
    movies = _parse_movies(movies_table)
    catalogue = _build_catalogue(movies)

    r_user = ratings_table.ints("userId")
    r_movie = ratings_table.ints("movieId")
    r_rating = ratings_table.ratings("rating")
    r_time = ratings_table.ints("timestamp")
    t_user = tags_table.ints("userId")
    t_movie = tags_table.ints("movieId")
    t_time = tags_table.ints("timestamp")

    movie_order = np.argsort(movies.movie_ids, kind="stable")
    sorted_ids = movies.movie_ids[movie_order]

    def movie_index(ids: np.ndarray) -> np.ndarray:
        """Catalogue index of each movieId, -1 when unknown."""
        if sorted_ids.size == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
        return np.where(sorted_ids[pos] == ids, movie_order[pos], -1)

    r_idx, t_idx = movie_index(r_movie), movie_index(t_movie)
    r_known, t_known = r_idx >= 0, t_idx >= 0
    user_ids = np.unique(np.concatenate([r_user[r_known], t_user[t_known]]))
    user_names = np.array([f"u{u}" for u in user_ids.tolist()], dtype=str)

    r_uidx = np.searchsorted(user_ids, r_user[r_known])
    order = np.lexsort((r_idx[r_known], r_time[r_known], r_uidx))
    ratings = _Ratings(
        user=r_uidx[order],
        movie=r_idx[r_known][order],
        rating=r_rating[r_known][order],
        timestamp=r_time[r_known][order],
    )
    t_uidx = np.searchsorted(user_ids, t_user[t_known])
    # Negatives are movies the user never rated nor tagged: both are engagements.
    n_movies = len(movies.movie_ids)
    engaged_keys = np.unique(
        np.concatenate(
            [ratings.user * n_movies + ratings.movie, t_uidx * n_movies + t_idx[t_known]]
        )
    )

    # One independent stream per task: changing one task's knobs leaves the others as they were.
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]
    derive = _Derivation(movies, ratings, engaged_keys, cfg)
    tag_text = [
        t for t, known in zip(tags_table.values["tag"], t_known.tolist(), strict=True) if known
    ]
    search, counts = derive.search(rngs[0], t_uidx, t_idx[t_known], tag_text, t_time[t_known])
    prequery, orphans = derive.prequery(rngs[1])
    blocks = [search, prequery, derive.more_like_this(rngs[2]), derive.entity(rngs[3])]
    log = _assemble(blocks, catalogue, user_names, rngs[4])

    by_task = {b.task: b for b in blocks}
    report = LoadReport(
        movies_read=len(movies_table),
        ratings_read=len(ratings_table),
        tags_read=len(tags_table),
        genres=len(movies.genre_names),
        users=len(user_ids),
        ratings_unknown_movie=int((~r_known).sum()),
        tags_unknown_movie=int((~t_known).sum()),
        tags_unusable=counts.unusable_tags,
        title_queries_too_short=counts.short_titles,
        low_ratings_without_positive=orphans,
        tag_sessions=counts.tag_sessions,
        title_sessions=counts.title_sessions,
        typo_sessions=counts.typo_sessions,
        tag_search_impressions=counts.tag_impressions,
        title_search_impressions=counts.title_impressions,
        typo_search_impressions=counts.typo_impressions,
        impressions_per_task={t: len(by_task[t].timestamp) for t in TASKS},
        rows_per_task={t: len(by_task[t].row_label) for t in TASKS},
        positives_per_task={t: int(by_task[t].row_label.sum()) for t in TASKS},
    )
    return catalogue, log, report
