"""Offline evaluation over the candidates the service would rank.

For each test impression with a positive: impute its context (shared code), retrieve
candidates with the service's retriever (a positive that retrieval misses is a miss),
featurise them, score, and compute NDCG@10, Recall@10 and MRR. Baselines re-rank the same
retrieved candidates with one feature column each. Search impressions can also be split
by query kind (``search_title`` / ``search_tag``, see ``is_title_query``).

Behavioural checks, each over requests built like the service's (``rank_requests``):

- ``relevance_guards``: a title's exact full name, searched by a real member, ranks first;
- ``typo_check``: the same with one typing error in one word of a popular title;
- ``prefix_check``: the first 3, 4, 5 characters of a popular title's name;
- ``taste_check``: members with a clear favourite genre get it in their prequery slate.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.catalogue import Catalogue
from app.core.context import TASKS, Context, Personalization, Task, impute_context, logged_in
from app.core.feature_tables import country_rows
from app.core.features import COL, FeatureBuilder
from app.core.retrieval import CandidateRetriever
from model_export.dataset import impression_context, impression_groups
from model_export.engagement_log import EngagementLog

K = 10
Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]
SEARCH_TITLE, SEARCH_TAG = "search_title", "search_tag"


@dataclass(frozen=True)
class TestImpression:
    context: Context
    positives: np.ndarray  # entity indices with label 1


def ranking_metrics(
    ranked: np.ndarray, positives: np.ndarray, k: int = K
) -> tuple[float, float, float]:
    """(NDCG@k, Recall@k, MRR) of one ranked list of entity indices, binary relevance."""
    if len(positives) == 0:
        raise ValueError("positives must not be empty")
    hit = np.isin(ranked, positives)
    top = hit[:k]
    dcg = float(np.sum(top / np.log2(np.arange(2, len(top) + 2))))
    ideal = float(np.sum(1.0 / np.log2(np.arange(2, min(len(positives), k) + 2))))
    first = np.flatnonzero(hit)
    mrr = 1.0 / (first[0] + 1) if len(first) else 0.0
    return dcg / ideal, float(top.sum()) / min(len(positives), k), mrr


def test_impressions(
    log: EngagementLog, builder: FeatureBuilder, per_task: int, seed: int
) -> dict[str, list[TestImpression]]:
    """Up to ``per_task`` impressions with a positive, per task, sampled with ``seed``."""
    catalogue = builder.catalogue
    targets = catalogue.lookup(log.target_entity_id)
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    for rows in impression_groups(log):
        if log.label[rows].any():
            by_task[str(log.task[rows[0]])].append(rows)

    out: dict[str, list[TestImpression]] = {}
    for task, groups in by_task.items():
        pick = rng.permutation(len(groups))[:per_task]
        out[task] = []
        for g in sorted(pick.tolist()):
            rows = groups[g]
            ctx = impression_context(log, rows[0], catalogue)
            out[task].append(TestImpression(ctx, np.unique(targets[rows][log.label[rows] == 1])))
    return out


@dataclass(frozen=True)
class System:
    """Something that ranks: a scorer applied to inputs built at a personalization level."""

    name: str
    level: Personalization
    score: Scorer
    tasks: tuple[str, ...] = TASKS


def column_scorer(*columns: str) -> Scorer:
    """A baseline: rank by dense feature columns, the first dominant, the rest tie-breaks."""
    idx = [COL[c] for c in columns]

    def score(inputs: dict[str, np.ndarray]) -> np.ndarray:
        dense = inputs["dense"]
        out = np.zeros(len(dense))
        for weight, i in zip([1.0, 1e-3, 1e-6], idx, strict=False):
            out += weight * dense[:, i]
        return out

    return score


BASELINES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("popularity", ("country_pop_log", "global_pop_log"), TASKS),
    ("bm25", ("bm25", "global_pop_log"), (Task.SEARCH,)),
    (
        "co-occurrence",
        # the share of the source's co-engagements: within one source, the plain count
        ("co_engagement_share", "linked_to_source", "global_pop_log"),
        (Task.MORE_LIKE_THIS, Task.ENTITY),
    ),
    ("matrix factorisation", ("user_item_dot", "global_pop_log"), (Task.PREQUERY,)),
)


# --------------------------------------------------------------- search query kinds


def _edit_budget(n_chars: int) -> int:
    """Edits a title query may be away from a name prefix: any query of 1-2 characters is
    within two edits of some prefix of every name, so the budget grows with the length."""
    return 0 if n_chars < 4 else 1 if n_chars < 8 else 2


def prefix_edit_distance(query: str, text: str) -> int:
    """Optimal-string-alignment distance (substitution, insertion, deletion, adjacent
    transposition) from ``query`` to the closest prefix of ``text``."""
    m = len(query)
    prev2: list[int] = []
    prev = list(range(len(text) + 1))  # row 0: query[:0] vs text[:j]
    for i in range(1, m + 1):
        row = [i] + [0] * len(text)
        for j in range(1, len(text) + 1):
            cost = query[i - 1] != text[j - 1]
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and query[i - 1] == text[j - 2] and query[i - 2] == text[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return min(prev)


def is_title_query(query: str, names: Iterable[str]) -> bool:
    """Whether a normalised search query names one of ``names`` (normalised): it is a
    prefix of the name from a word boundary, or within ``_edit_budget`` edits of one
    (0 edits below 4 characters, 1 for 4-7, 2 from 8). Otherwise it is a tag query (a
    genre, a mood, a person...)."""
    if not query:
        return False
    budget = _edit_budget(len(query))
    for name in names:
        starts = [0] + [i + 1 for i, ch in enumerate(name) if ch == " "]
        for start in starts:
            rest = name[start:]
            if rest.startswith(query):
                return True
            if budget and prefix_edit_distance(query, rest[: len(query) + budget]) <= budget:
                return True
    return False


def title_query_mask(imps: list[TestImpression], names: np.ndarray) -> np.ndarray:
    """(len(imps),) bool: which search impressions are title queries (``is_title_query``
    against the normalised names of their positives)."""
    return np.array(
        [is_title_query(imp.context.query, names[imp.positives].tolist()) for imp in imps],
        dtype=bool,
    )


# ------------------------------------------------------------------ ranking metrics


def _aggregate(per_impression: np.ndarray) -> dict[str, float]:
    n = len(per_impression)
    total = per_impression.sum(axis=0) / max(n, 1)
    return {
        "ndcg@10": float(total[0]),
        "recall@10": float(total[1]),
        "mrr": float(total[2]),
        "candidate_recall": float(total[3]),
        "n": float(n),
    }


def evaluate_systems(
    systems: list[System],
    impressions: dict[str, list[TestImpression]],
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    max_retrieved: int,
    split_search: bool = False,
) -> dict[str, dict[str, dict[str, float]]]:
    """{system: {task: {ndcg@10, recall@10, mrr, n, candidate_recall}}}.

    With ``split_search``, every system that runs on search also gets ``search_title``
    and ``search_tag`` entries (the search impressions of that kind; absent when none)."""
    results: dict[str, dict[str, dict[str, float]]] = {s.name: {} for s in systems}
    for task, imps in impressions.items():
        active = [s for s in systems if task in s.tasks]
        per = {s.name: np.zeros((len(imps), 4)) for s in active}
        for i, imp in enumerate(imps):
            cache: dict[Personalization, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
            for s in active:
                if s.level not in cache:
                    cf = builder.context(imp.context, s.level)
                    cand = retriever.retrieve(cf, limit=max_retrieved)
                    cache[s.level] = (cand, builder.candidates(cf, cand))
                cand, inputs = cache[s.level]
                scores = np.asarray(s.score(inputs), dtype=np.float64)
                ranked = cand[np.lexsort((cand, -scores))]
                ndcg, recall, mrr = ranking_metrics(ranked, imp.positives)
                retrieved = float(np.isin(imp.positives, cand).mean())
                per[s.name][i] = (ndcg, recall, mrr, retrieved)
        subsets = {task: np.ones(len(imps), dtype=bool)}
        if split_search and task == Task.SEARCH:
            title = title_query_mask(imps, builder.text.names)
            subsets[SEARCH_TITLE], subsets[SEARCH_TAG] = title, ~title
        for name, rows in per.items():
            for subset, mask in subsets.items():
                if subset == task or mask.any():
                    results[name][subset] = _aggregate(rows[mask])
    return results


# ------------------------------------------------------- requests built like the service


@dataclass(frozen=True)
class Request:
    """A raw request of a behavioural check (no source entity: search or prequery)."""

    task: str
    user_id: str
    query: str
    country: str


def rank_requests(
    systems: list[System],
    requests: list[Request],
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    max_retrieved: int,
) -> list[dict[str, np.ndarray]]:
    """For each request, every system's ranked candidate indices (best first), with the
    context imputed, candidates retrieved and featurised once per personalization level,
    as the service does. Ties are broken by entity index, as in ``evaluate_systems``."""
    out: list[dict[str, np.ndarray]] = []
    for req in requests:
        ctx = impute_context(req.task, req.user_id, req.query, req.country, None, lambda _: None)
        cache: dict[Personalization, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        ranked: dict[str, np.ndarray] = {}
        for s in systems:
            if s.level not in cache:
                cf = builder.context(ctx, s.level)
                cand = retriever.retrieve(cf, limit=max_retrieved)
                cache[s.level] = (cand, builder.candidates(cf, cand))
            cand, inputs = cache[s.level]
            scores = np.asarray(s.score(inputs), dtype=np.float64)
            ranked[s.name] = cand[np.lexsort((cand, -scores))]
        out.append(ranked)
    return out


def _rank_of(ranked: np.ndarray, target: int) -> float:
    """0-based position of ``target`` in ``ranked``; inf when it was not retrieved."""
    hit = np.flatnonzero(ranked == target)
    return float(hit[0]) if len(hit) else float("inf")


def unique_name_titles(builder: FeatureBuilder) -> np.ndarray:
    """Rankable entities whose (non-empty) normalised name no other entity shares."""
    names = builder.text.names
    uniq, counts = np.unique(names, return_counts=True)
    unique_name = np.isin(names, uniq[counts == 1]) & builder.catalogue.rankable & (names != "")
    return np.flatnonzero(unique_name)


def popular_titles(builder: FeatureBuilder, n: int) -> np.ndarray:
    """Up to ``n`` titles with a unique name, by train-split positives (the serving
    tables' ``entity_pos``), most popular first; titles never engaged with are left out."""
    titles = unique_name_titles(builder)
    pos = builder.tables.entity_pos[titles]
    titles, pos = titles[pos > 0], pos[pos > 0]
    return titles[np.lexsort((titles, -pos))][:n]


def title_askers(
    log: EngagementLog,
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    titles: np.ndarray,
    rng: np.random.Generator,
) -> dict[int, tuple[str, str]]:
    """For each title, a (user_id, country) of a random logged-in row of ``log`` whose
    country has the title; titles no such row can see are left out."""
    rows = np.flatnonzero(logged_in(log.user_id))
    if len(rows) == 0:
        return {}
    crow = country_rows(builder.catalogue, log.country[rows])
    out: dict[int, tuple[str, str]] = {}
    for t in titles.tolist():
        ok = rows[retriever.allowed[crow, t]]
        if len(ok):
            r = int(ok[rng.integers(len(ok))])
            out[int(t)] = (str(log.user_id[r]), str(log.country[r]))
    return out


# ---------------------------------------------------------------------- relevance guard


def guard_pairs(
    log: EngagementLog,
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    n_pairs: int,
    seed: int,
) -> list[tuple[int, Request]]:
    """Up to ``n_pairs`` (title, search for its display name by a random logged-in member
    of ``log``) pairs; titles with a shared normalised name are skipped (ambiguous), and
    so are pairs whose member's country does not have the title."""
    catalogue = builder.catalogue
    rng = np.random.default_rng(seed)
    titles = unique_name_titles(builder)
    users_rows = np.flatnonzero(logged_in(log.user_id))
    pairs: list[tuple[int, Request]] = []
    if len(titles) == 0 or len(users_rows) == 0:
        return pairs
    for _ in range(n_pairs * 3):
        if len(pairs) >= n_pairs:
            break
        r = users_rows[rng.integers(len(users_rows))]
        t = int(titles[rng.integers(len(titles))])
        country = str(log.country[r])
        if not retriever.allowed[country_rows(catalogue, np.array([country]))[0], t]:
            continue
        query = str(catalogue.display_name[t])
        pairs.append((t, Request(Task.SEARCH, str(log.user_id[r]), query, country)))
    return pairs


def relevance_guards(
    log: EngagementLog,
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    systems: list[System],
    n_pairs: int,
    max_retrieved: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """{system: {pairs, top1_share}}: the share of (member, exact full-title query) pairs
    where the title ranks first, each system at its own personalization level, all on the
    same pairs."""
    pairs = guard_pairs(log, builder, retriever, n_pairs, seed)
    ranked = rank_requests(systems, [req for _, req in pairs], builder, retriever, max_retrieved)
    out: dict[str, dict[str, float]] = {}
    for s in systems:
        firsts = sum(_rank_of(r[s.name], t) == 0 for (t, _), r in zip(pairs, ranked, strict=True))
        out[s.name] = {"pairs": float(len(pairs)), "top1_share": firsts / max(len(pairs), 1)}
    return out


def relevance_guard(
    log: EngagementLog,
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    score: Scorer,
    n_pairs: int,
    max_retrieved: int,
    seed: int,
    level: Personalization = Personalization.FULL,
) -> dict[str, float]:
    """Share of (user, full-title query) pairs where that title ranks first at ``level``.

    Titles whose normalised name is shared with another entity are skipped (ambiguous)."""
    system = System("guard", level, score, (Task.SEARCH,))
    return relevance_guards(log, builder, retriever, [system], n_pairs, max_retrieved, seed)[
        "guard"
    ]


# --------------------------------------------------------------------------- typo check

TYPO_KINDS: tuple[str, ...] = ("transposition", "missing_letter", "doubled_letter", "accent")
MIN_TYPO_WORD_LETTERS = 4
_ADD_ACCENT = {"a": "á", "e": "é", "i": "í", "o": "ó", "u": "ú"}  # on a vowel


def _strip_accent(ch: str) -> str:
    base = "".join(c for c in unicodedata.normalize("NFD", ch) if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", base)


def _typo_positions(word: str, kind: str) -> list[int]:
    """Positions in ``word`` where a typo of ``kind`` changes it."""
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    if kind == "transposition":
        return [
            i
            for i in letters
            if i + 1 < len(word) and word[i + 1].isalpha() and word[i] != word[i + 1]
        ]
    if kind in ("missing_letter", "doubled_letter"):
        return letters
    if kind == "accent":
        accented = [i for i in letters if _strip_accent(word[i]) != word[i]]
        return accented or [i for i in letters if word[i] in _ADD_ACCENT]
    raise ValueError(f"typo kind must be one of {list(TYPO_KINDS)}, got {kind!r}")


def typo_word(word: str, kind: str, rng: np.random.Generator) -> str | None:
    """``word`` with one typing error of ``kind`` at a random position (None when the
    kind cannot change the word): two adjacent letters swapped, a letter dropped, a letter
    typed twice, or an accent dropped (when the word has one) or added on a vowel (e->é)."""
    positions = _typo_positions(word, kind)
    if not positions:
        return None
    i = positions[int(rng.integers(len(positions)))]
    if kind == "transposition":
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "missing_letter":
        return word[:i] + word[i + 1 :]
    if kind == "doubled_letter":
        return word[: i + 1] + word[i:]
    stripped = _strip_accent(word[i])
    return word[:i] + (stripped if stripped != word[i] else _ADD_ACCENT[word[i]]) + word[i + 1 :]


def typo_title(name: str, kind: str, rng: np.random.Generator) -> str | None:
    """The normalised ``name`` with one typo of ``kind`` in one random word of at least
    ``MIN_TYPO_WORD_LETTERS`` letters (None when no word qualifies)."""
    words = name.split(" ")
    eligible = [
        i
        for i, w in enumerate(words)
        if sum(ch.isalpha() for ch in w) >= MIN_TYPO_WORD_LETTERS and _typo_positions(w, kind)
    ]
    if not eligible:
        return None
    i = eligible[int(rng.integers(len(eligible)))]
    typo = typo_word(words[i], kind, rng)
    if typo is None:  # pragma: no cover - eligible words always have a position
        return None
    return " ".join([*words[:i], typo, *words[i + 1 :]])


def _hit_shares(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    out = {"n": float(len(ranks))}
    for k in ks:
        out[f"top{k}"] = float(np.mean(ranks < k)) if len(ranks) else float("nan")
    out["retrieved"] = float(np.mean(np.isfinite(ranks))) if len(ranks) else float("nan")
    return out


def _ask_titles(
    log: EngagementLog,
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    systems: list[System],
    max_retrieved: int,
    seed: int,
    n_titles: int,
    variants: Callable[[str, np.random.Generator], list[tuple[str, str]]],
) -> tuple[int, np.ndarray, dict[str, np.ndarray], list[tuple[str, str, str]]]:
    """Each of the ``n_titles`` most popular uniquely named titles, searched by every
    ``(label, query)`` that ``variants(name, rng)`` makes of its normalised name, asked by
    a random logged-in member of ``log`` whose country has the title.

    Returns (titles asked, each query's label, {system: each query's rank of the title},
    [(label, name, query)] in order)."""
    rng = np.random.default_rng(seed)
    titles = popular_titles(builder, n_titles)
    askers = title_askers(log, builder, retriever, titles, rng)
    names = builder.text.names
    requests: list[Request] = []
    meta: list[tuple[int, str, str, str]] = []
    for t in titles.tolist():
        if t not in askers:
            continue
        user, country = askers[t]
        for label, query in variants(str(names[t]), rng):
            requests.append(Request(Task.SEARCH, user, query, country))
            meta.append((t, label, str(names[t]), query))
    ranked = rank_requests(systems, requests, builder, retriever, max_retrieved)
    ranks = {
        s.name: np.array([_rank_of(r[s.name], m[0]) for m, r in zip(meta, ranked, strict=True)])
        for s in systems
    }
    labels = np.array([m[1] for m in meta], dtype=str)
    return len(askers), labels, ranks, [m[1:] for m in meta]


def typo_check(
    log: EngagementLog,
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    systems: list[System],
    max_retrieved: int,
    seed: int,
    n_titles: int = 300,
) -> dict[str, Any]:
    """Search the whole normalised name of each of the ``n_titles`` most popular titles
    with a unique name, with one typo of each kind (``typo_title``) in turn, asked by a
    random logged-in member of ``log`` whose country has the title.

    Returns {titles, queries, examples: {kind: [[name, typo], ...]},
    systems: {system: {kind | "overall": {n, top1, top3, retrieved}}}}."""

    def typos(name: str, rng: np.random.Generator) -> list[tuple[str, str]]:
        made = ((kind, typo_title(name, kind, rng)) for kind in TYPO_KINDS)
        return [(kind, query) for kind, query in made if query is not None]

    n, kinds, ranks, asked = _ask_titles(
        log, builder, retriever, systems, max_retrieved, seed, n_titles, typos
    )
    examples = {k: [[name, q] for label, name, q in asked if label == k][:3] for k in TYPO_KINDS}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, r in ranks.items():
        out[name] = {kind: _hit_shares(r[kinds == kind], (1, 3)) for kind in TYPO_KINDS}
        out[name]["overall"] = _hit_shares(r, (1, 3))
    return {"titles": n, "queries": len(kinds), "examples": examples, "systems": out}


# ------------------------------------------------------------------------- prefix check

PREFIX_LENGTHS: tuple[int, ...] = (3, 4, 5)


def prefix_check(
    log: EngagementLog,
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    systems: list[System],
    max_retrieved: int,
    seed: int,
    n_titles: int = 300,
    lengths: tuple[int, ...] = PREFIX_LENGTHS,
) -> dict[str, Any]:
    """Search the first 3, 4 and 5 characters of the normalised name of each of the
    ``n_titles`` most popular titles with a unique name (titles no longer than the prefix
    are left out of that length), asked by a random logged-in member of ``log``.

    Many titles share a prefix with a more popular one, so 1.0 is not reachable.
    Returns {titles, systems: {system: {str(length): {n, top3, top10, retrieved}}}}."""

    def prefixes(name: str, _: np.random.Generator) -> list[tuple[str, str]]:
        return [(str(n), name[:n]) for n in lengths if len(name) > n and name[:n].strip()]

    n, lens, ranks, _asked = _ask_titles(
        log, builder, retriever, systems, max_retrieved, seed, n_titles, prefixes
    )
    out = {
        name: {str(k): _hit_shares(r[lens == str(k)], (3, 10)) for k in lengths}
        for name, r in ranks.items()
    }
    return {"titles": n, "systems": out}


# -------------------------------------------------------------------------- taste check

TASTE_MIN_POSITIVES = 10
TASTE_MIN_SHARE = 0.4
TASTE_MIN_LIFT = 3.0
TASTE_K = 20


@dataclass(frozen=True)
class TasteMember:
    """A member with a clear favourite genre (``taste_members``)."""

    user_id: str
    country: str  # their most frequent country in the test log ("" when unknown)
    genre: str
    share: float  # of their train-split positives that carry the genre
    base_share: float  # of all train-split positives that carry it
    positives: int


def taste_members(
    train: EngagementLog,
    test: EngagementLog,
    catalogue: Catalogue,
    min_positives: int = TASTE_MIN_POSITIVES,
    min_share: float = TASTE_MIN_SHARE,
    min_lift: float = TASTE_MIN_LIFT,
) -> list[TasteMember]:
    """Logged-in members of ``test`` whose favourite genre is clear in ``train``: they have
    at least ``min_positives`` positives there, and the genre carried by the largest share
    of them (ties: the first in genre order) is carried by at least ``min_share`` of their
    positives and by at least ``min_lift`` times the share of all positives carrying it.
    Sorted by user id."""
    genres, matrix = catalogue.genre_names, catalogue.genre_matrix > 0
    pos = (train.label == 1) & logged_in(train.user_id)
    targets = catalogue.lookup(train.target_entity_id[pos])
    known = targets >= 0
    users = train.user_id[pos][known]
    targets = targets[known]
    if len(targets) == 0 or not genres:
        return []
    carried = matrix[targets]  # (P, G)
    base = carried.mean(axis=0)
    uids, inverse = np.unique(users, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(uids))
    per_genre = [
        np.bincount(inverse, weights=carried[:, g], minlength=len(uids)) for g in range(len(genres))
    ]
    share = np.stack(per_genre, axis=1) / counts[:, None]
    fav = share.argmax(axis=1)
    fav_share = share[np.arange(len(uids)), fav]
    fav_base = base[fav]
    in_test = np.isin(uids, test.user_id[logged_in(test.user_id)])
    ok = (
        in_test
        & (counts >= min_positives)
        & (fav_share >= min_share)
        & (fav_share >= min_lift * fav_base)
    )
    members: list[TasteMember] = []
    for u in np.flatnonzero(ok).tolist():
        user = str(uids[u])
        countries, n = np.unique(test.country[test.user_id == user], return_counts=True)
        members.append(
            TasteMember(
                user,
                str(countries[int(np.argmax(n))]),
                genres[int(fav[u])],
                float(fav_share[u]),
                float(fav_base[u]),
                int(counts[u]),
            )
        )
    return members


def taste_check(
    train: EngagementLog,
    test: EngagementLog,
    builder: FeatureBuilder,
    retriever: CandidateRetriever,
    systems: list[System],
    max_retrieved: int,
    seed: int,
    max_members: int = 100,
    k: int = TASTE_K,
) -> dict[str, Any]:
    """For up to ``max_members`` members with a clear favourite genre (``taste_members``,
    a seeded sample), a prequery request from their usual country: the share of each
    system's top ``k`` that carries the member's favourite genre, averaged over members.
    ``none`` is the unpersonalised reference; ``base_share`` what a random positive has.

    Returns {thresholds, qualifying, members, mean_train_share, mean_base_share,
    genres: {genre: members}, systems: {system: {"genre_share@k": mean, "n"}}}."""
    catalogue = builder.catalogue
    qualifying = taste_members(train, test, catalogue)
    rng = np.random.default_rng(seed)
    pick = sorted(rng.permutation(len(qualifying))[:max_members].tolist())
    members = [qualifying[i] for i in pick]
    genres, matrix = catalogue.genre_names, catalogue.genre_matrix > 0
    col = {g: i for i, g in enumerate(genres)}
    requests = [Request(Task.PREQUERY, m.user_id, "", m.country) for m in members]
    ranked = rank_requests(systems, requests, builder, retriever, max_retrieved)
    out: dict[str, dict[str, float]] = {}
    for s in systems:
        shares = [
            float(matrix[r[s.name][:k], col[m.genre]].mean()) if len(r[s.name]) else 0.0
            for m, r in zip(members, ranked, strict=True)
        ]
        out[s.name] = {
            f"genre_share@{k}": float(np.mean(shares)) if shares else float("nan"),
            "n": float(len(shares)),
        }
    by_genre: dict[str, int] = {}
    for m in members:
        by_genre[m.genre] = by_genre.get(m.genre, 0) + 1
    return {
        "thresholds": {
            "min_positives": TASTE_MIN_POSITIVES,
            "min_share": TASTE_MIN_SHARE,
            "min_lift": TASTE_MIN_LIFT,
            "k": k,
        },
        "qualifying": len(qualifying),
        "members": len(members),
        "mean_train_share": float(np.mean([m.share for m in members])) if members else float("nan"),
        "mean_base_share": float(np.mean([m.base_share for m in members]))
        if members
        else float("nan"),
        "genres": dict(sorted(by_genre.items())),
        "systems": out,
    }
