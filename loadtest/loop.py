"""``make loop``: the feedback loop closed end to end, scored against the synthetic world's
ground truth (docs/EVALUATION.md, "The closed loop").

1. Serve a bundle built from the default synthetic world (``bundles/demo``) as its own
   process, with ``UNICORN_EVENTS_DIR`` set to a fresh directory and raw user ids.
2. Simulated members of the SAME world (``model_export.synthetic``: its hidden taste, its
   popularity and its engagement model, never the trained model) run sessions of every
   task over HTTP; each looks at the answer top-down and engages with what it sees; the
   engagements are POSTed to ``/events`` in batches.
3. Stop the server (SIGTERM: the event files are flushed), build two bundles from the
   events (``unicorn build-bundle --source events --catalogue-from BUNDLE --quick``):
   ``cold``, whose item vectors and clusters are pre-trained from the events, and
   ``warm``, which carries the original's item space over (``--warm-start BUNDLE``).
   Then serve the ORIGINAL and both RETRAINED bundles to the same FRESH sessions (another
   seed) and compare them per task: expected engagements of the top 10 under the true
   model, NDCG@10 against the true probabilities, and catalogue coverage / concentration.

    .venv/bin/python -m loadtest.loop                                 # ~15 min on 2 cores
    .venv/bin/python -m loadtest.loop --seeds 1 --log-sessions 500    # a quick look
    .venv/bin/python -m loadtest.loop --write docs/EVALUATION.md      # update the doc

The member model (everything below is seeded: the same seed gives the same sessions, and
given the same answers the same engagements):

- A session's member is drawn by the world's activity weights, with their home country;
  always logged in (``user_id`` "u<n>"), ``personalization`` full by default.
- search: the title the member wants is drawn as the world draws intents (popularity-drawn
  candidates re-drawn by taste); the query is what the world's members type for it (from
  its first word, or from a later one; 2 characters up to the whole name; typing on past
  another title's exact name; the world's typo rate). One request per session: the final
  keystroke. prequery: the member and the country. more_like_this: a title the member is
  on, one they would play (the same intent draw over videos) or, 20% of the time, a
  popular video. entity: a genre, collection or person page chosen as the world chooses
  them (8 random pages of a kind, the best-liked likelier).
- Truth ``p(member, item)`` is ``engagement_probability`` of the task with the world's
  relevance (more_like_this: cosine of source and item; entity: linked to the page;
  prequery: 0), the member's true taste and the item's country popularity; 0 for an item
  not available in the member's country, and for the page's own source. search: the
  wanted title has the world's play probability for the typed query; the one matching
  title the member likes best, if they like it more, ``ALT_CLICK_RATE``; others 0.
- Examination: position k (0-based) is looked at with probability ``1 / log2(k + 2)``;
  an item is engaged when a uniform draw of that session and position is below
  ``examination(k) * p``. The expected engagements of a top 10 is therefore exactly
  DCG@10 with the true probabilities as gains, and NDCG@10 divides it by the best top 10
  of the available catalogue.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.core.catalogue import Catalogue
from app.core.context import TASKS, normalise_query, tokenize
from loadtest.markdown import table, write_block
from loadtest.processes import ROOT, ServiceProcess
from model_export import synthetic as sw

K = 10  # positions scored (and requested)
EVENT_BATCH = 1000  # POST /events takes at most this many per call
EVAL_SEED_OFFSET = 100  # fresh sessions of loop seed s are drawn with seed s + this
TOP_POPULAR = 0.01  # the most popular share of the catalogue whose slot share is reported
BLOCK = "loop"
SECTION = "## The closed loop (make loop)"
DOC = ROOT / "docs" / "EVALUATION.md"
DEFAULT_BUNDLE = ROOT / "bundles" / "demo"
DEFAULT_WORK = ROOT / "data" / "loop"
# The retrained bundles compared with the original, each built from the same events:
ARMS = {
    "cold": "the events alone: item vectors and clusters pre-trained from the log",
    "warm": "the events, the item space carried over from the original (`--warm-start`)",
}


def examination(k: int) -> np.ndarray:
    """(k,) probability that a member looks at each position, 0-based: 1 / log2(pos + 2)."""
    return 1.0 / np.log2(np.arange(k) + 2.0)


# --------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    """The hidden parts of a synthetic world: its entities (latents, popularity, names,
    links, availability) and users (taste, country, activity), rebuilt from the world's
    seed exactly as ``model_export.synthetic.build_world`` builds them (without the log)."""

    config: sw.WorldConfig
    ent: Any = field(repr=False)  # model_export.synthetic._Entities
    users: Any = field(repr=False)  # model_export.synthetic._Users
    sim: Any = field(repr=False)  # model_export.synthetic._Simulator

    @classmethod
    def of(cls, config: sw.WorldConfig | None = None) -> GroundTruth:
        config = config or sw.WorldConfig()
        # build_world's streams: entities from the first, users from the second
        streams = np.random.SeedSequence(config.seed).spawn(8)
        ent = sw._Entities(config, np.random.default_rng(streams[0]))
        users = sw._Users(config, ent, np.random.default_rng(streams[1]))
        return cls(config, ent, users, sw._Simulator(config, ent, users))

    @property
    def n_rankable(self) -> int:
        return int(self.config.n_rankable)

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.ent.ids)

    @property
    def popularity(self) -> np.ndarray:
        """(R,) the rankable entities' global log popularity (the world's truth)."""
        return np.asarray(self.ent.log_pop[: self.n_rankable])

    def check_catalogue(self, catalogue: Catalogue) -> None:
        """Raise unless ``catalogue`` is this world's (same entity ids, same order)."""
        if len(catalogue) != len(self.ids) or not np.array_equal(catalogue.entity_id, self.ids):
            raise SystemExit(
                f"the bundle's catalogue ({len(catalogue)} entities) is not the synthetic "
                f"world of {self.config} ({len(self.ids)} entities): build it with "
                "`unicorn build-bundle --source synthetic` (make bundle)"
            )

    def index_of(self, entity_ids: Sequence[str]) -> np.ndarray:
        """Entity index per id (-1 for an id the world does not have)."""
        ids = self.ids
        order = np.argsort(ids)
        wanted = np.asarray(entity_ids, dtype=str)
        if len(wanted) == 0:
            return np.zeros(0, dtype=np.int64)
        pos = np.clip(np.searchsorted(ids, wanted, sorter=order), 0, len(ids) - 1)
        found = order[pos]
        return np.where(ids[found] == wanted, found, -1).astype(np.int64)


# --------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Sessions:
    """One task's simulated sessions, one ``/rank`` request each (entity indices)."""

    task: str
    user: np.ndarray  # (S,) user index: user_id "u<n>"
    country: np.ndarray  # (S,) country index (the member's home)
    query: np.ndarray  # (S,) str typed query, "" for none
    source: np.ndarray  # (S,) page entity, -1 for none
    target: np.ndarray  # (S,) search: the wanted title, else -1
    alternative: np.ndarray  # (S,) search: the matching title liked more, else -1
    draws: np.ndarray  # (S, K) uniforms: engaged at position k iff draw < exam(k) * p

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray | slice) -> Sessions:
        return Sessions(
            self.task,
            self.user[rows],
            self.country[rows],
            self.query[rows],
            self.source[rows],
            self.target[rows],
            self.alternative[rows],
            self.draws[rows],
        )

    def bodies(self, truth: GroundTruth, k: int = K, personalization: str = "full") -> list[Any]:
        """The ``/rank`` request bodies, in session order."""
        countries = truth.config.countries
        ids = truth.ids
        out: list[dict[str, Any]] = []
        for i in range(len(self)):
            body: dict[str, Any] = {
                "task": self.task,
                "user_id": f"u{int(self.user[i])}",
                "country": countries[int(self.country[i])],
                "k": k,
                "personalization": personalization,
            }
            if self.task == "search":
                body["query"] = str(self.query[i])
            if self.source[i] >= 0:
                body["source_entity_id"] = str(ids[int(self.source[i])])
            out.append(body)
        return out


def session_rng(seed: int, task: str) -> np.random.Generator:
    """One independent stream per (seed, task): a task's sessions never shift another's."""
    return np.random.default_rng(np.random.SeedSequence([seed, TASKS.index(task)]))


def draw_sessions(truth: GroundTruth, task: str, n: int, seed: int, k: int = K) -> Sessions:
    """``n`` sessions of ``task`` (fewer where the world has no page to start from)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    rng = session_rng(seed, task)
    sim = truth.sim
    s = sim._sessions(rng, n)
    user, country = s.user.astype(np.int64), s.country.astype(np.int64)
    query = np.full(n, "", dtype=str)
    source = np.full(n, -1, dtype=np.int64)
    target = np.full(n, -1, dtype=np.int64)
    if task == "search":
        target = sim._intent(rng, s, sim.rankable).astype(np.int64)
        query = _typed_queries(truth, rng, np.maximum(target, 0))
    elif task == "more_like_this":
        wanted = sim._intent(rng, s, sim.videos)
        popular = sim.videos.draw(rng, s.country, 1, popular=True)[:, 0]
        from_taste = rng.random(n) < sw.HISTORY_SOURCE_RATE
        source = np.where(from_taste & (wanted >= 0), wanted, popular).astype(np.int64)
    elif task == "entity":
        source = _entity_pages(truth, rng, user)
    draws = rng.random((n, k))
    keep = (target >= 0) if task == "search" else np.ones(n, dtype=bool)
    if task in ("more_like_this", "entity"):
        keep &= source >= 0
    out = Sessions(task, user, country, query, source, target, np.full(n, -1), draws).take(keep)
    if task == "search":
        out = dataclasses.replace(out, alternative=_alternatives(truth, out))
    return out


def _typed_queries(truth: GroundTruth, rng: np.random.Generator, target: np.ndarray) -> np.ndarray:
    """What members type for ``target``: the world's search model
    (``model_export.synthetic._Simulator.typed_query``), its final keystroke only."""
    text, _ = truth.sim.typed_query(rng, target)
    return np.asarray(text, dtype=str)


def _entity_pages(truth: GroundTruth, rng: np.random.Generator, user: np.ndarray) -> np.ndarray:
    """The page each member opens, as the world chooses them (``_Simulator.entity``)."""
    ent = truth.ent
    n = len(user)
    degree = np.diff(ent.link_indptr)
    starts = (ent.genre_start, ent.collection_start, ent.person_start, ent.n)
    pools = [np.flatnonzero(degree[a:b] > 0) + a for a, b in itertools.pairwise(starts)]
    kind_p = np.array(
        [p if len(pool) else 0.0 for p, pool in zip(sw.ENTITY_TYPE_P, pools, strict=True)]
    )
    if kind_p.sum() == 0:
        return np.full(n, -1, dtype=np.int64)
    kind = rng.choice(3, size=n, p=kind_p / kind_p.sum())
    cand = np.zeros((n, 8), dtype=np.int64)
    for t, pool in enumerate(pools):
        rows = np.flatnonzero(kind == t)
        if len(rows) and len(pool):
            cand[rows] = pool[rng.integers(0, len(pool), (len(rows), 8))]
    taste = np.einsum("sd,smd->sm", truth.users.taste[user], ent.latent[cand])
    w = np.exp(sw.INTENT_TASTE * (taste - taste.max(axis=1, keepdims=True)))
    return cand[np.arange(n), sw._choose_weighted(rng, w)].astype(np.int64)


def _alternatives(truth: GroundTruth, s: Sessions) -> np.ndarray:
    """Per search session: the available title with a name token starting with the last
    typed token that the member likes best, where they like it more than the wanted one
    and the query is not the wanted title's full name (-1 otherwise)."""
    ent, r = truth.ent, truth.n_rankable
    out = np.full(len(s), -1, dtype=np.int64)
    if len(s) == 0:
        return out
    q_norm = [normalise_query(q) for q in s.query.tolist()]
    last = np.array([(tokenize(q) or [""])[-1] for q in q_norm], dtype=str)
    exact = np.array(q_norm, dtype=str) == ent.name_norm[s.target]
    tokens = ent.tokens[:r]
    target_taste = np.einsum("sd,sd->s", truth.users.taste[s.user], ent.latent[s.target])
    for token in np.unique(last).tolist():
        rows = np.flatnonzero((last == token) & ~exact)
        if token == "" or len(rows) == 0:
            continue
        hit = ((tokens != "") & np.strings.startswith(tokens, token)).any(axis=1)
        ok = hit[None, :] & ent.available[s.country[rows]][:, :r]
        ok[np.arange(len(rows)), s.target[rows]] = False
        taste = truth.users.taste[s.user[rows]] @ ent.latent[:r].T
        taste = np.where(ok, taste, -np.inf)
        best = np.argmax(taste, axis=1)
        best_taste = taste[np.arange(len(rows)), best]
        out[rows] = np.where(np.isfinite(best_taste) & (best_taste > target_taste[rows]), best, -1)
    return out


# --------------------------------------------------------------------------- the member model


def probabilities(truth: GroundTruth, s: Sessions, items: np.ndarray) -> np.ndarray:
    """(S, M) true P(engage) of each session's member with ``items`` (S, M) entity indices
    (-1 = nothing there / unknown: 0); see the module docstring."""
    ent, r = truth.ent, truth.n_rankable
    items = np.asarray(items, dtype=np.int64)
    valid = (items >= 0) & (items < r)
    it = np.where(valid, items, 0)
    c = s.country[:, None]
    available = ent.available[c, it]
    if s.task == "search":
        t = s.target
        rel = sw.search_relevance(
            np.array([normalise_query(q) for q in s.query.tolist()], dtype=str),
            ent.name_norm[t],
            ent.tokens[t],
        )
        taste_t = np.einsum("sd,sd->s", truth.users.taste[s.user], ent.latent[t])
        p_t = sw.engagement_probability("search", rel, taste_t, truth.sim.pop_z[s.country, t])
        p = np.where(it == t[:, None], p_t[:, None], 0.0)
        alt = s.alternative[:, None]
        p = np.where((alt >= 0) & (it == alt), sw.ALT_CLICK_RATE, p)
    else:
        taste = np.einsum("sd,smd->sm", truth.users.taste[s.user], ent.latent[it])
        pop = truth.sim.pop_z[c, it]
        if s.task == "more_like_this":
            rel = np.einsum("sd,smd->sm", ent.latent[np.maximum(s.source, 0)], ent.latent[it])
        elif s.task == "entity":
            pages = np.broadcast_to(s.source[:, None], it.shape)
            rel = ent.linked(pages.ravel(), it.ravel()).reshape(it.shape).astype(np.float64)
        else:
            rel = np.zeros(it.shape)
        p = sw.engagement_probability(s.task, rel, taste, pop)
        p = np.where(it == s.source[:, None], 0.0, p)
    return np.where(valid & available, p, 0.0).astype(np.float64)


def all_probabilities(truth: GroundTruth, s: Sessions, chunk: int = 256) -> np.ndarray:
    """(S, R) true P(engage) of every rankable entity for each session."""
    r = truth.n_rankable
    out = np.zeros((len(s), r))
    for lo in range(0, len(s), chunk):
        part = s.take(slice(lo, lo + chunk))
        out[lo : lo + len(part)] = probabilities(
            truth, part, np.broadcast_to(np.arange(r), (len(part), r))
        )
    return out


def engaged(p_shown: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(S, K) bool: the member engaged at each position (examined AND engaged)."""
    k = p_shown.shape[1]
    return draws[:, :k] < examination(k)[None, :] * p_shown


# --------------------------------------------------------------------------- figures


def dcg(gains: np.ndarray, k: int = K) -> np.ndarray:
    """(S,) sum over the first k positions of gain / log2(pos + 2)."""
    g = np.asarray(gains, dtype=np.float64)[:, :k]
    return (g * examination(g.shape[1])[None, :]).sum(axis=1)


def expected_engagements(p_shown: np.ndarray, k: int = K) -> np.ndarray:
    """(S,) expected engagements of the top k under the member model (= DCG@k)."""
    return dcg(p_shown, k)


def ndcg(p_shown: np.ndarray, p_all: np.ndarray, k: int = K) -> np.ndarray:
    """(S,) DCG@k of what was shown over DCG@k of the best k (true probabilities as gains);
    NaN where nothing could be engaged."""
    ideal = dcg(-np.sort(-np.asarray(p_all, dtype=np.float64), axis=1), k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ideal > 0, dcg(p_shown, k) / np.where(ideal > 0, ideal, 1.0), np.nan)


def exposure(shown: np.ndarray, n_items: int, k: int = K) -> np.ndarray:
    """(n_items,) top-k slots each item took (-1 entries ignored)."""
    top = np.asarray(shown, dtype=np.int64)[:, :k].ravel()
    top = top[(top >= 0) & (top < n_items)]
    return np.bincount(top, minlength=n_items)


def coverage(shown: np.ndarray, n_items: int, k: int = K) -> float:
    """Share of the ``n_items`` catalogue shown in at least one top k."""
    return float((exposure(shown, n_items, k) > 0).sum() / n_items) if n_items else 0.0


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of exposure over items (0 = every item equally, -> 1 = one item)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), float(x.sum())
    if n == 0 or total == 0:
        return 0.0
    return float(2.0 * np.sum(np.arange(1, n + 1) * x) / (n * total) - (n + 1) / n)


def top_share(shown: np.ndarray, popularity: np.ndarray, fraction: float = TOP_POPULAR) -> float:
    """Share of the filled top-k slots taken by the ``fraction`` most popular items."""
    counts = exposure(shown, len(popularity))
    n_top = max(1, math.ceil(fraction * len(popularity)))
    top = np.argsort(-np.asarray(popularity), kind="stable")[:n_top]
    total = counts.sum()
    return float(counts[top].sum() / total) if total else 0.0


@dataclass(frozen=True)
class Figures:
    """One bundle's answers to one set of sessions."""

    sessions: int
    engagements: float  # mean expected engagements of the top 10
    ndcg: float  # mean NDCG@10 (sessions where something can be engaged)
    coverage: float
    gini: float
    top_share: float
    short: int  # answers with fewer than K items


def figures(
    truth: GroundTruth, s: Sessions | None, shown: np.ndarray, p_all: np.ndarray | None
) -> Figures:
    """The figures of ``shown`` (S, K) for sessions ``s``; coverage alone when ``s`` is None
    (several tasks' answers pooled)."""
    r = truth.n_rankable
    if s is None or p_all is None:
        eng = nd = float("nan")
    else:
        p_shown = probabilities(truth, s, shown)
        eng = float(expected_engagements(p_shown).mean()) if len(s) else float("nan")
        scores = ndcg(p_shown, p_all)
        nd = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
    return Figures(
        sessions=len(shown),
        engagements=eng,
        ndcg=nd,
        coverage=coverage(shown, r),
        gini=gini(exposure(shown, r)),
        top_share=top_share(shown, truth.popularity),
        short=int(((np.asarray(shown)[:, :K] >= 0).sum(axis=1) < K).sum()),
    )


# --------------------------------------------------------------------------- HTTP


@dataclass
class Answers:
    request_ids: list[str]
    shown: np.ndarray  # (S, K) entity indices, -1 where the answer was shorter / unknown


def rank_all(
    client: httpx.Client,
    truth: GroundTruth,
    bodies: list[dict[str, Any]],
    concurrency: int = 2,
    k: int = K,
) -> Answers:
    """POST every body to ``/rank`` (``concurrency`` at a time); answers in body order."""

    def one(body: dict[str, Any]) -> tuple[str, list[str]]:
        response = client.post("/rank", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"/rank {body} -> {response.status_code}: {response.text[:300]}")
        answer = response.json()
        rid = answer.get("request_id") or response.headers.get("x-request-id", "")
        return str(rid), [str(item["entity_id"]) for item in answer["items"][:k]]

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(one, bodies))
    shown = np.full((len(bodies), k), -1, dtype=np.int64)
    for i, (_, ids) in enumerate(results):
        shown[i, : len(ids)] = truth.index_of(ids)
    return Answers([rid for rid, _ in results], shown)


def engagement_events(
    tag: str,
    s: Sessions,
    answers: Answers,
    hits: np.ndarray,
    truth: GroundTruth,
    index: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The ``/events`` payload items of the engagements ``hits`` (S, K) of sessions ``s``
    (``index``: their numbers among the task's sessions, default 0..S-1); event ids are
    deterministic (``tag``-task-session-position), so a resend is a duplicate."""
    now = time.time()
    ids, n_videos = truth.ids, truth.config.n_videos
    number = np.arange(len(s)) if index is None else np.asarray(index)
    out = []
    for i, pos in zip(*np.nonzero(hits), strict=True):
        entity = int(answers.shown[i, pos])
        out.append(
            {
                "event_id": f"{tag}-{s.task}-{int(number[i])}-{int(pos)}",
                "request_id": answers.request_ids[i],
                "entity_id": str(ids[entity]),
                "type": "play" if entity < n_videos else "click",
                "ts": now,
            }
        )
    return out


def post_events(client: httpx.Client, events: list[dict[str, Any]]) -> tuple[int, int]:
    """POST ``events`` in batches of ``EVENT_BATCH``; (accepted, duplicates) summed."""
    accepted = duplicates = 0
    for lo in range(0, len(events), EVENT_BATCH):
        batch = events[lo : lo + EVENT_BATCH]
        response = client.post("/events", json={"events": batch})
        if response.status_code != 200:
            raise RuntimeError(f"/events -> {response.status_code}: {response.text[:300]}")
        answer = response.json()
        accepted += int(answer["accepted"])
        duplicates += int(answer["duplicates"])
    return accepted, duplicates


# --------------------------------------------------------------------------- the phases


def say(message: str) -> None:
    print(f"[loop {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class LogStats:
    seed: int
    requests: dict[str, int] = field(default_factory=dict)
    engagements: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    duplicates: int = 0
    members: int = 0
    impression_files: int = 0
    engagement_files: int = 0
    seconds: float = 0.0


def schedule(sessions: dict[str, Sessions], seed: int) -> list[tuple[str, int]]:
    """Every (task, session) in one seeded random order: the tasks interleave in time, as
    members' sessions do (the training split is temporal per member, so a loop that ran
    one task after another would leave whole tasks out of the fit or the test window)."""
    pairs = [(task, i) for task, s in sessions.items() for i in range(len(s))]
    order = np.random.default_rng(np.random.SeedSequence([seed, len(TASKS)])).permutation(
        len(pairs)
    )
    return [pairs[i] for i in order.tolist()]


def run_sessions(
    server_url: str,
    truth: GroundTruth,
    sessions: dict[str, Sessions],
    *,
    seed: int = 0,
    personalization: str = "full",
    concurrency: int = 2,
    post: bool = False,
    tag: str = "loop",
    chunk: int = 1000,
    label: str = "",
) -> tuple[dict[str, np.ndarray], LogStats]:
    """Run every session against a live server, the tasks interleaved (``schedule``); with
    ``post``, engage and POST the engagements in batches as they come. Returns what was
    shown per task (session order)."""
    stats = LogStats(seed=seed)
    shown = {t: np.full((len(s), K), -1, dtype=np.int64) for t, s in sessions.items()}
    rids = {t: [""] * len(s) for t, s in sessions.items()}
    bodies = {t: s.bodies(truth, K, personalization) for t, s in sessions.items()}
    engagements = dict.fromkeys(sessions, 0)
    plan = schedule(sessions, seed)
    pending: list[dict[str, Any]] = []
    started = time.perf_counter()

    def flush(events: list[dict[str, Any]]) -> None:
        a, d = post_events(client, events)
        stats.accepted, stats.duplicates = stats.accepted + a, stats.duplicates + d

    with httpx.Client(base_url=server_url, timeout=60) as client:
        for lo in range(0, len(plan), chunk):
            part = plan[lo : lo + chunk]
            answers = rank_all(client, truth, [bodies[t][i] for t, i in part], concurrency)
            for j, (t, i) in enumerate(part):
                shown[t][i], rids[t][i] = answers.shown[j], answers.request_ids[j]
            if post:
                for t in sessions:
                    index = np.array([i for task, i in part if task == t], dtype=np.int64)
                    if len(index) == 0:
                        continue
                    s = sessions[t].take(index)
                    hits = engaged(probabilities(truth, s, shown[t][index]), s.draws)
                    engagements[t] += int(hits.sum())
                    got = Answers([rids[t][i] for i in index.tolist()], shown[t][index])
                    pending += engagement_events(tag, s, got, hits, truth, index)
                while len(pending) >= EVENT_BATCH:
                    flush(pending[:EVENT_BATCH])
                    pending = pending[EVENT_BATCH:]
            done = min(lo + chunk, len(plan))
            say(f"{label}{done}/{len(plan)} sessions ({time.perf_counter() - started:.0f} s)")
        if pending:
            flush(pending)
    stats.requests = {t: len(s) for t, s in sessions.items()}
    stats.engagements = engagements
    stats.members = len({int(u) for s in sessions.values() for u in s.user.tolist()})
    stats.seconds = time.perf_counter() - started
    return shown, stats


def serve(bundle: Path, log_path: Path, events_dir: Path | None = None) -> ServiceProcess:
    settings: dict[str, Any] = {"bundle": bundle}
    if events_dir is not None:
        settings |= {"events_dir": events_dir, "events_raw_user_ids": "true"}
    return ServiceProcess(settings, log_path=log_path)


def log_phase(
    truth: GroundTruth,
    bundle: Path,
    work: Path,
    seed: int,
    n_sessions: int,
    *,
    personalization: str = "full",
    concurrency: int = 2,
) -> tuple[Path, LogStats]:
    """Serve ``bundle`` with events on, run ``n_sessions`` sessions per task of ``seed``,
    engage and post; stop the server (the files are flushed). Returns the events folder."""
    events_dir = work / "events"
    shutil.rmtree(events_dir, ignore_errors=True)
    events_dir.mkdir(parents=True)
    sessions = {t: draw_sessions(truth, t, n_sessions, seed) for t in TASKS}
    server = serve(bundle, work / "serve-log.log", events_dir).start()
    try:
        say(f"seed {seed}: logging {n_sessions} sessions per task on {server.url}")
        _, stats = run_sessions(
            server.url, truth, sessions, personalization=personalization,
            seed=seed, concurrency=concurrency, post=True, tag=f"loop-s{seed}",
            label=f"s{seed} log ",
        )  # fmt: skip
    finally:
        code = server.stop()
    if code not in (0, None, -15):  # uvicorn re-raises the SIGTERM it handled
        say(f"warning: the server exited with {code} (log: {server.log_path})")
    stats.impression_files = len(list(events_dir.glob("impression*.parquet")))
    stats.engagement_files = len(list(events_dir.glob("engagement*.parquet")))
    if stats.impression_files == 0:
        raise RuntimeError(f"no impression files in {events_dir} (log: {server.log_path})")
    return events_dir, stats


def join_report(events_dir: Path, bundle: Path) -> dict[str, Any]:
    """The build's join report (the same rules ``build-bundle --source events`` applies)."""
    from model_export.event_source import catalogue_from, load_events

    _, report = load_events(events_dir, catalogue=catalogue_from(bundle))
    return report.as_dict()


def build_phase(
    events_dir: Path, bundle: Path, out: Path, log_path: Path, *, warm: bool = False
) -> float:
    """``unicorn build-bundle --source events ... --quick`` into ``out`` (with ``warm``,
    ``--warm-start bundle``); its seconds."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "model_export.cli", "build-bundle", "--source", "events",
        "--path", str(events_dir), "--catalogue-from", str(bundle), "--out", str(out), "--quick",
        *(["--warm-start", str(bundle)] if warm else []),
    ]  # fmt: skip
    say(f"building {out} from the events: {shlex.join(cmd[2:])}")
    started = time.perf_counter()
    with log_path.open("wb") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"build-bundle failed ({code}) after {seconds:.0f} s:\n{tail}")
    say(f"built {out} in {seconds:.0f} s")
    return seconds


def eval_phase(
    truth: GroundTruth,
    bundles: dict[str, Path],
    sessions: dict[str, Sessions],
    work: Path,
    *,
    personalization: str = "full",
    concurrency: int = 2,
    label: str = "",
) -> dict[str, dict[str, Figures]]:
    """Serve each bundle in turn to the same sessions: name -> task (and "all") -> figures."""
    p_all = {t: all_probabilities(truth, s) for t, s in sessions.items()}
    out: dict[str, dict[str, Figures]] = {}
    for name, bundle in bundles.items():
        with serve(bundle, work / f"serve-{name}.log") as server:
            shown, _ = run_sessions(
                server.url, truth, sessions, personalization=personalization,
                concurrency=concurrency, label=f"{label}{name} ",
            )  # fmt: skip
        out[name] = {t: figures(truth, sessions[t], shown[t], p_all[t]) for t in sessions}
        out[name]["all"] = figures(truth, None, np.concatenate(list(shown.values())), None)
    return out


# --------------------------------------------------------------------------- the report


@dataclass
class SeedRun:
    seed: int
    log: LogStats
    join: dict[str, Any]
    eval: dict[str, dict[str, Figures]]  # "original" and each of ARMS -> task -> figures
    retrained: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> build facts


def _spread(values: list[float], digits: int) -> str:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}"


def _values(runs: list[SeedRun], bundle: str, task: str, metric: str) -> list[float]:
    return [float(getattr(r.eval[bundle][task], metric)) for r in runs]


def _deltas(runs: list[SeedRun], task: str, metric: str, arm: str) -> list[float]:
    return [
        float(getattr(r.eval[arm][task], metric) - getattr(r.eval["original"][task], metric))
        for r in runs
    ]


def verdicts(runs: list[SeedRun], arm: str) -> list[str]:
    """One line per task: ``arm`` better, worse or level with the original (paired, per
    seed: 'better' / 'worse' when every seed agrees and the mean moves by > 2%)."""
    lines = []
    for task in TASKS:
        parts = []
        for metric, name in (("engagements", "expected engagements"), ("ndcg", "NDCG@10")):
            base = np.nanmean(_values(runs, "original", task, metric))
            d = np.array(_deltas(runs, task, metric, arm))
            rel = float(np.mean(d) / base) if base else 0.0
            if np.all(d > 0) and rel > 0.02:
                word = "better"
            elif np.all(d < 0) and rel < -0.02:
                word = "worse"
            else:
                word = "level"
            parts.append(f"{name} {word} ({rel:+.1%})")
        lines.append(f"- {task}: {', '.join(parts)}.")
    return lines


def concentration(runs: list[SeedRun], arm: str) -> list[str]:
    """One line per task (and all tasks): does ``arm`` show fewer titles and give more of
    its slots to the most popular ones ('more concentrated', every seed), the reverse
    ('less concentrated'), or neither ('mixed')?"""
    lines = []
    for task in (*TASKS, "all"):
        cov = np.array(_deltas(runs, task, "coverage", arm))
        top = np.array(_deltas(runs, task, "top_share", arm))
        if np.all(cov < 0) and np.all(top > 0):
            word = "more concentrated"
        elif np.all(cov > 0) and np.all(top < 0):
            word = "less concentrated"
        else:
            word = "mixed"
        name = "all tasks" if task == "all" else task
        o_cov, r_cov = (np.mean(_values(runs, b, task, "coverage")) for b in ("original", arm))
        o_top, r_top = (np.mean(_values(runs, b, task, "top_share")) for b in ("original", arm))
        lines.append(
            f"- {name}: {word} (coverage {o_cov:.3f} -> {r_cov:.3f}, top-1% share "
            f"{o_top:.3f} -> {r_top:.3f})."
        )
    return lines


JOIN_FIELDS = (
    "impression_files", "engagement_files", "impressions_read", "impressions_duplicate",
    "impressions_invalid", "impressions_unknown_source", "impressions_used",
    "impressions_hashed_user", "impressions_engaged", "engagements_read",
    "engagements_duplicate", "engagements_unknown_type", "engagements_orphan",
    "engagements_unshown", "engagements_late", "engagements_used", "engagements_skewed",
    "shown_rows", "rows_dropped_by_position", "rows_unknown_entity", "rows", "positives",
)  # fmt: skip


def render(runs: list[SeedRun], settings: dict[str, Any], command: str) -> str:
    """The generated block of docs/EVALUATION.md."""
    seeds = [r.seed for r in runs]
    bundles = ("original", *ARMS)
    lines = [
        f"Command: `{command}` ({settings['minutes']:.1f} min on this machine). "
        f"World: the default `WorldConfig()` (seed {settings['world_seed']}, "
        f"{settings['members']} members, {settings['rankable']} rankable titles), the one "
        f"`{settings['bundle']}` was built from (model `{settings['original_version']}`). "
        f"Loop seeds {seeds}: per seed, {settings['log_sessions']} logged sessions per task "
        f"(one `/rank` each, k={K}, personalization `{settings['personalization']}`), then "
        f"{settings['eval_sessions']} fresh sessions per task (seed + {EVAL_SEED_OFFSET}) "
        "served by every bundle. Figures are means ± sd over the seeds (sample sd).",
        "",
        "The retrained bundles, both `unicorn build-bundle --source events --quick` on the same "
        "events:",
        "",
        *(f"- **{arm}**: {what}." for arm, what in ARMS.items()),
        "",
        "**The log and the join** (per seed):",
        "",
    ]
    rows: list[list[object]] = []
    for task in TASKS:
        rows.append([f"requests: {task}", *(r.log.requests.get(task, 0) for r in runs)])
    for task in TASKS:
        rows.append([f"engagements: {task}", *(r.log.engagements.get(task, 0) for r in runs)])
    rows += [
        ["distinct members", *(r.log.members for r in runs)],
        ["/events accepted", *(r.log.accepted for r in runs)],
        ["/events duplicates", *(r.log.duplicates for r in runs)],
        *([f"join: {f}", *(r.join.get(f, "n/a") for r in runs)] for f in JOIN_FIELDS),
        ["join: positives by position 0..9, 10+",
         *(" ".join(map(str, r.join.get("positives_by_position", []))) for r in runs)],
    ]  # fmt: skip
    for arm in ARMS:
        rows += [
            [f"{arm}: training rows", *(r.retrained[arm]["train_rows"] for r in runs)],
            [f"{arm}: members with vectors", *(r.retrained[arm]["users"] for r in runs)],
            [f"{arm}: build seconds", *(round(r.retrained[arm]["seconds"]) for r in runs)],
            [f"{arm}: model version", *(f"`{r.retrained[arm]['version']}`" for r in runs)],
        ]
    lines.append(table(["", *(f"seed {s}" for s in seeds)], rows, align="l" + "r" * len(runs)))
    for metric, title in (
        ("engagements", "Expected engagements of the top 10"),
        ("ndcg", "NDCG@10"),
    ):
        lines += [
            "",
            f"**{title} on fresh sessions** (expected engagements: DCG@10 under the true member "
            "model, its probabilities as gains; NDCG@10 divides it by the best top 10 of the "
            "available catalogue; Δ: retrained − original, paired per seed):",
            "",
        ]
        q_rows = []
        for task in TASKS:
            row = [task, _spread(_values(runs, "original", task, metric), 3)]
            for arm in ARMS:
                row += [
                    _spread(_values(runs, arm, task, metric), 3),
                    _spread(_deltas(runs, task, metric, arm), 3),
                ]
            q_rows.append(row)
        header = ["task", "original", *(h for arm in ARMS for h in (arm, f"Δ {arm}"))]
        lines.append(table(header, q_rows, align="l" + "r" * (len(header) - 1)))
    lines += [
        "",
        f"**Diversity** (coverage: distinct titles in any top 10 / {settings['rankable']} "
        f"rankable; Gini of top-10 slots over the rankable catalogue; top 1%: share of the "
        f"top-10 slots taken by the {max(1, math.ceil(TOP_POPULAR * settings['rankable']))} "
        "most popular titles by the world's true popularity):",
        "",
    ]
    d_rows = []
    for task in (*TASKS, "all"):
        d_rows.append(
            [
                "all tasks" if task == "all" else task,
                *(
                    _spread(_values(runs, bundle, task, metric), 3)
                    for metric in ("coverage", "gini", "top_share")
                    for bundle in bundles
                ),
            ]
        )
    header = [
        "task",
        *(f"{name} {b}" if b == "original" else b for name in ("coverage", "Gini", "top 1%")
          for b in bundles),
    ]  # fmt: skip
    lines.append(table(header, d_rows, align="l" + "r" * (len(header) - 1)))
    short = {b: sum(r.eval[b][t].short for r in runs for t in TASKS) for b in bundles}
    lines += [
        "",
        f"Answers shorter than {K} (all seeds and tasks): "
        + ", ".join(f"{b} {short[b]}" for b in bundles)
        + " (their empty slots count as 0).",
    ]
    for arm in ARMS:
        lines += [
            "",
            f"**{arm}** against the original, per task, paired over the seeds (`better` / "
            "`worse`: every seed agrees and the mean moves by more than 2%; `more "
            "concentrated`: on every seed fewer titles shown AND a larger share of slots for "
            "the top 1%):",
            "",
            *verdicts(runs, arm),
            *concentration(runs, arm),
        ]
    return "\n".join(lines)


def ensure_section(path: Path) -> None:
    """Add the section and its markers at the end of ``path`` when it has none."""
    text = path.read_text()
    if f"<!-- {BLOCK}:begin" in text and f"<!-- {BLOCK}:end -->" in text:
        return
    section = (
        f"\n{SECTION}\n\n"
        f"<!-- {BLOCK}:begin (generated by loadtest/loop.py; do not edit by hand) -->\n"
        f"<!-- {BLOCK}:end -->\n"
    )
    path.write_text(text.rstrip("\n") + "\n" + section)


# --------------------------------------------------------------------------- main


def run_loop(
    args: argparse.Namespace,
    truth: GroundTruth | None = None,
    progress: Callable[[str], None] = say,
) -> tuple[list[SeedRun], dict[str, Any]]:
    """Every phase of every seed; (runs, settings)."""
    from app.core.bundle import read_manifest

    truth = truth or GroundTruth.of()
    bundle = Path(args.bundle).resolve()
    truth.check_catalogue(Catalogue.load(bundle / "catalogue.npz"))
    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        work = Path(args.work_dir).resolve() / f"s{seed}"
        work.mkdir(parents=True, exist_ok=True)
        events_dir, stats = log_phase(
            truth, bundle, work, seed, args.log_sessions,
            personalization=args.personalization, concurrency=args.concurrency,
        )  # fmt: skip
        progress(
            f"seed {seed}: {sum(stats.requests.values())} requests, "
            f"{sum(stats.engagements.values())} engagements ({stats.accepted} accepted, "
            f"{stats.duplicates} duplicates) in {stats.seconds:.0f} s"
        )
        join = join_report(events_dir, bundle)
        built: dict[str, Path] = {}
        facts: dict[str, dict[str, Any]] = {}
        for arm in ARMS:
            built[arm] = work / f"bundle-{arm}"
            seconds = build_phase(
                events_dir, bundle, built[arm], work / f"build-{arm}.log", warm=arm == "warm"
            )
            manifest = read_manifest(built[arm])
            facts[arm] = {
                "seconds": seconds,
                "version": str(manifest["model_version"]),
                "train_rows": int(manifest.get("training", {}).get("rows", 0) or 0),
                "users": int(manifest.get("data", {}).get("users_with_vectors", 0) or 0),
            }
        fresh = {
            t: draw_sessions(truth, t, args.eval_sessions, seed + EVAL_SEED_OFFSET) for t in TASKS
        }
        evaluation = eval_phase(
            truth, {"original": bundle, **built}, fresh, work,
            personalization=args.personalization, concurrency=args.concurrency,
            label=f"s{seed} eval ",
        )  # fmt: skip
        runs.append(SeedRun(seed, stats, join, evaluation, facts))
        for arm in ARMS:
            for task in (*TASKS, "all"):
                o, r = evaluation["original"][task], evaluation[arm][task]
                progress(
                    f"seed {seed} {arm} {task:>14}: engagements {o.engagements:.3f} -> "
                    f"{r.engagements:.3f}, ndcg {o.ndcg:.3f} -> {r.ndcg:.3f}, coverage "
                    f"{o.coverage:.3f} -> {r.coverage:.3f}, top1% {o.top_share:.3f} -> "
                    f"{r.top_share:.3f}"
                )
    settings = {
        "minutes": (time.perf_counter() - started) / 60.0,
        "world_seed": truth.config.seed,
        "members": truth.config.n_users,
        "rankable": truth.n_rankable,
        "bundle": os.path.relpath(bundle, ROOT),
        "original_version": read_manifest(bundle)["model_version"],
        "log_sessions": args.log_sessions,
        "eval_sessions": args.eval_sessions,
        "personalization": args.personalization,
    }
    return runs, settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--log-sessions", type=int, default=7500, help="per task and seed")
    parser.add_argument("--eval-sessions", type=int, default=1000, help="per task and seed")
    parser.add_argument("--personalization", choices=("none", "cluster", "full"), default="full")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight")
    parser.add_argument("--write", type=Path, default=None, help="docs/EVALUATION.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_sessions < 1 or args.eval_sessions < 1:
        raise SystemExit("--log-sessions and --eval-sessions must be >= 1")
    runs, settings = run_loop(args)
    command = os.environ.get("LOOP_COMMAND") or shlex.join(
        ["python", "-m", "loadtest.loop", *(argv if argv is not None else sys.argv[1:])]
    )
    body = render(runs, settings, command)
    print(body, flush=True)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "settings": settings,
                    "runs": [
                        {
                            "seed": r.seed,
                            "log": r.log.__dict__,
                            "join": r.join,
                            "retrained": r.retrained,
                            "eval": {
                                b: {t: f.__dict__ for t, f in per.items()}
                                for b, per in r.eval.items()
                            },
                        }
                        for r in runs
                    ],
                },
                indent=1,
            )
            + "\n"
        )
    if args.write is not None:
        ensure_section(args.write)
        write_block(args.write, BLOCK, body)
        say(f"wrote the {BLOCK} block of {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
