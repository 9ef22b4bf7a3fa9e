"""The unified context and the paper's imputation rules: ONE implementation for training
and serving.

Every request, whatever the product surface, becomes the tuple
``{task, user_id, query, country, source_entity_id}``. Missing parts become explicit
tokens so that the model sees "absent" as a value it learned, never as garbage:

- search: the source entity is the explicit ``NULL_SOURCE`` token;
- more_like_this / entity: the query is imputed from the source entity's display name;
- prequery: neither a query (``""``) nor a source (``NULL_SOURCE``);
- missing user / country: ``UNKNOWN_USER`` / ``UNKNOWN_COUNTRY``.

User ids and country codes are cleaned by ``clean_user_id`` and ``clean_country`` (and
their column forms, for logs), the one rule the feature tables are keyed by too.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

NULL_SOURCE = "<null_source>"
UNKNOWN_USER = "<unknown_user>"
UNKNOWN_COUNTRY = "<unknown_country>"
MAX_QUERY_CHARS = 200  # normalised queries are cut here; the API refuses longer input

_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


class Task(StrEnum):
    SEARCH = "search"
    PREQUERY = "prequery"
    MORE_LIKE_THIS = "more_like_this"
    ENTITY = "entity"


class Personalization(StrEnum):
    NONE = "none"
    CLUSTER = "cluster"
    FULL = "full"


TASKS: tuple[str, ...] = tuple(t.value for t in Task)  # the one list of tasks


def normalise_query(text: str | None) -> str:
    """NFKC, case fold, accents folded, punctuation to spaces, whitespace collapsed; at
    most ``MAX_QUERY_CHARS`` characters. ``None`` and blank input give ``""``."""
    if not text:
        return ""
    folded = unicodedata.normalize("NFKC", text).casefold()
    # Accent folding: decompose, drop the combining diacritical marks ("é" -> "e", "ś" ->
    # "s"), recompose, so "Amélie" and "amelie" are the same query. Only the diacritics
    # blocks: other combining marks spell letters (Devanagari virama, Japanese dakuten)
    # and are kept. After the case fold, which can undo NFKC ("ß" + accent -> "ss" +
    # accent): "ß" + accent must match "SS" + accent as typed.
    stripped = re.sub(
        "[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]",
        "",
        unicodedata.normalize("NFKD", folded),
    )
    folded = unicodedata.normalize("NFKC", stripped)
    words = _NON_WORD.sub(" ", folded).replace("_", " ").split()
    return " ".join(words)[:MAX_QUERY_CHARS].strip()


def tokenize(normalised: str) -> list[str]:
    """Tokens of an already normalised string."""
    return normalised.split()


def clean_user_id(user_id: str | None) -> str:
    """The member id as the service keys it: trimmed; ``UNKNOWN_USER`` when missing or
    blank. The one rule for user ids: the context and the feature tables both apply it."""
    return (user_id or "").strip() or UNKNOWN_USER


def clean_country(country: str | None) -> str:
    """The country code as the service keys it: trimmed and upper-cased;
    ``UNKNOWN_COUNTRY`` when missing, blank or that token already (so cleaning an
    imputed country gives it back)."""
    code = (country or "").strip().upper()
    return code if code and code != UNKNOWN_COUNTRY.upper() else UNKNOWN_COUNTRY


def clean_user_ids(user_ids: np.ndarray) -> np.ndarray:
    """``clean_user_id`` of every element of a str array (a log column)."""
    return _each_distinct(clean_user_id, user_ids)


def clean_countries(countries: np.ndarray) -> np.ndarray:
    """``clean_country`` of every element of a str array (a log column)."""
    return _each_distinct(clean_country, countries)


def logged_in(user_ids: np.ndarray) -> np.ndarray:
    """Bool mask of the log rows of a member: those ``clean_user_id`` does not make
    ``UNKNOWN_USER``."""
    return clean_user_ids(user_ids) != UNKNOWN_USER


def _each_distinct(rule: Callable[[str], str], values: np.ndarray) -> np.ndarray:
    # The scalar rule itself, once per distinct value (a log column repeats its values):
    # a re-implementation with numpy string functions could disagree with it.
    distinct, inverse = np.unique(np.asarray(values, dtype=str), return_inverse=True)
    cleaned = np.array([rule(v) for v in distinct.tolist()], dtype=str)
    return cleaned[inverse.reshape(-1)].reshape(np.shape(values))


@dataclass(frozen=True, slots=True)
class Context:
    """A request after imputation: no field is ever missing."""

    task: Task
    user_id: str
    query: str
    country: str
    source_entity_id: str
    query_imputed: bool

    def as_dict(self) -> dict[str, object]:
        return {
            "task": self.task.value,
            "user_id": self.user_id,
            "query": self.query,
            "country": self.country,
            "source_entity_id": self.source_entity_id,
            "query_imputed": self.query_imputed,
        }


def impute_context(
    task: str,
    user_id: str | None,
    query: str | None,
    country: str | None,
    source_entity_id: str | None,
    source_name: Callable[[str], str | None],
) -> Context:
    """Apply the paper's imputation rules to a raw request or log row.

    ``source_name`` maps an entity id to its display name (``None`` when unknown).
    Raises ``ValueError`` naming the field when the task or a required value is invalid.
    """
    try:
        the_task = Task(task)
    except ValueError:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}") from None
    user = clean_user_id(user_id)
    the_country = clean_country(country)
    source = (source_entity_id or "").strip()
    normalised = normalise_query(query)
    imputed = False
    if the_task is Task.SEARCH:
        if not normalised:
            raise ValueError("query is required for task search (non-empty after normalisation)")
        source = NULL_SOURCE
    elif the_task is Task.PREQUERY:
        source, normalised = NULL_SOURCE, ""
    else:
        if not source:
            raise ValueError(f"source_entity_id is required for task {the_task.value}")
        name = source_name(source)
        if name is None:
            raise LookupError(f"source_entity_id {source!r} is not in the catalogue")
        if not normalised:
            normalised, imputed = normalise_query(name), True
    return Context(the_task, user, normalised, the_country, source, imputed)
