"""The deterministic synthetic world: a catalogue and a unified engagement log for every task.

A seeded generative model of a streaming service: entities (videos, games, genres,
collections, people) with names built from real English words, a latent "taste space",
users who belong to taste clusters, and sessions of all four UniCoRn tasks logged exactly
as a production service would log them (raw context, impressions with non-engaged
negatives, one row per impressed target). The same seed always gives identical arrays.
The formulas and default sizes are documented in ``docs/DATA.md`` (section "Synthetic
world"); the constants below are the numbers that section quotes.

Use it from Python::

    from model_export.synthetic import WorldConfig, generate_world
    catalogue, log = generate_world(WorldConfig(seed=7))

or measure a world from the shell (rows per task, seconds, peak memory)::

    python -m model_export.synthetic --users 1000000 --videos 95000 --games 5000
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np

from app.core.catalogue import Catalogue
from app.core.context import TASKS, normalise_query, tokenize
from model_export.engagement_log import EngagementLog

# fmt: off
# --- Vocabularies -------------------------------------------------------------------------
# Real words, so that prefixes are realistic and ambiguous ("sta" -> star, stone, storm...).
# The list order is the popularity order of words in titles (Zipf-like), so the first words
# occur in many titles.
TITLE_WORDS: tuple[str, ...] = (
    "star", "night", "love", "dark", "house", "world", "city", "last", "river", "secret", "lost",
    "blood", "king", "dream", "girl", "heart", "fire", "shadow", "life", "time", "storm", "empire",
    "midnight", "garden", "ocean", "summer", "winter", "silver", "golden", "broken", "hidden",
    "silent", "wild", "iron", "stone", "glass", "ice", "snow", "rain", "thunder", "light", "dawn",
    "dusk", "moon", "sun", "sky", "cloud", "wind", "desert", "forest", "mountain", "valley",
    "island", "harbor", "street", "road", "bridge", "tower", "castle", "kingdom", "home", "family",
    "father", "mother", "brother", "sister", "daughter", "queen", "prince", "princess", "knight",
    "soldier", "hunter", "stranger", "ghost", "angel", "devil", "dragon", "wolf", "lion", "tiger",
    "eagle", "raven", "fox", "horse", "bear", "whale", "spider", "snake", "soul", "mind", "memory",
    "promise", "truth", "war", "peace", "death", "planet", "galaxy", "space", "orbit", "rocket",
    "signal", "code", "machine", "robot", "engine", "circuit", "echo", "mirror", "window", "door",
    "key", "letter", "book", "story", "song", "dance", "game", "race", "chase", "escape", "return",
    "journey", "quest", "voyage", "path", "trail", "border", "frontier", "station", "train", "ship",
    "harvest", "feast", "wedding", "funeral", "birthday", "holiday", "festival", "carnival",
    "circus", "theater", "stage", "studio", "camera", "picture", "portrait", "painting", "canvas",
    "color", "scarlet", "violet", "amber", "emerald", "sapphire", "diamond", "pearl", "crown",
    "throne", "sword", "shield", "arrow", "bullet", "gun", "badge", "detective", "doctor", "nurse",
    "teacher", "student", "lawyer", "judge", "pilot", "captain", "sailor", "pirate", "cowboy",
    "outlaw", "sheriff", "agent", "spy", "thief", "killer", "witness", "victim", "suspect", "jury",
    "crime", "justice", "revenge", "betrayal", "honor", "glory", "legend", "myth", "saga",
    "chronicle", "diary", "journal", "notebook", "whisper", "scream", "silence", "noise", "music",
    "rhythm", "melody", "harmony", "jazz", "blues", "rock", "disco", "ballet", "opera", "symphony",
    "kitchen", "bakery", "coffee", "sugar", "honey", "salt", "pepper", "lemon", "cherry", "apple",
    "orange", "peach", "plum", "rose", "lily", "tulip", "daisy", "orchid", "willow", "oak", "pine",
    "maple", "cedar", "meadow", "prairie", "canyon", "cliff", "cave", "tunnel", "shore", "beach",
    "wave", "tide", "current", "flood", "drought", "blizzard", "hurricane", "tornado", "volcano",
    "earthquake", "comet", "meteor", "nebula", "eclipse", "horizon", "zenith", "north", "south",
    "east", "west", "central", "upper", "lower", "inner", "outer", "little", "big", "tall", "short",
    "young", "old", "new", "ancient", "modern", "future", "past", "present", "first", "second",
    "final", "eternal", "endless", "infinite", "perfect", "strange", "curious", "lucky", "brave",
    "bold", "quiet", "loud", "happy", "sad", "angry", "lonely", "crazy", "sweet", "bitter", "cold",
    "warm", "hot", "frozen", "burning", "falling", "rising", "running", "flying", "sleeping",
    "dancing", "singing", "waiting", "hunting", "dreaming", "missing", "forgotten", "forbidden",
    "haunted", "cursed", "blessed", "sacred", "royal", "rebel", "savage", "gentle", "wicked",
    "innocent", "guilty", "honest", "fallen", "risen",
)
GAME_SUFFIXES: tuple[str, ...] = (
    "quest", "legends", "arena", "tactics", "rush", "saga", "online", "heroes", "run", "party",
)
COLLECTION_SUFFIXES: tuple[str, ...] = (
    "Picks", "Favourites", "Classics", "Essentials", "Nights", "Marathon", "Gems", "Hits",
    "Stories", "Collection",
)
GENRE_NAMES: tuple[str, ...] = (
    "Drama", "Comedy", "Thriller", "Documentary", "Horror", "Romance", "Action", "Animation",
    "Crime", "Family", "Fantasy", "Science Fiction", "Mystery", "Musical", "Adventure", "Reality",
    "Anime", "Sports", "History", "War", "Western", "Kids", "Stand-Up Comedy", "Biography", "Music",
    "Teen", "Nature", "Cooking", "Travel", "True Crime",
)
FIRST_NAMES: tuple[str, ...] = (
    "Emma", "Liam", "Olivia", "Noah", "Ava", "Lucas", "Mia", "Mateo", "Sofia", "Hugo", "Chloe",
    "Yuki", "Hana", "Kenji", "Priya", "Arjun", "Amara", "Kwame", "Lena", "Jonas", "Clara", "Felix",
    "Marta", "Diego", "Lucia", "Pierre", "Camille", "Ines", "Omar", "Leila", "Sven", "Ingrid",
    "Rosa", "Pablo", "Grace", "Daniel", "Ruth", "Samuel", "Nina", "Victor",
)
LAST_NAMES: tuple[str, ...] = (
    "Smith", "Garcia", "Muller", "Martin", "Silva", "Tanaka", "Kim", "Rossi", "Novak", "Johansson",
    "Dubois", "Santos", "Okafor", "Mensah", "Patel", "Sharma", "Nakamura", "Schmidt", "Fischer",
    "Lopez", "Moreau", "Costa", "Ito", "Park", "Chen", "Wang", "Jensen", "Larsen", "Kowalski",
    "Horvat", "Brown", "Wilson", "Taylor", "Murphy", "Walsh", "Bauer", "Weber", "Romano", "Ferrari",
    "Alves",
)
# ISO 3166-1 alpha-2 codes; a world uses the first ``n_countries``. Earlier countries
# have more members (weights ~ 1/rank^0.7).
COUNTRY_CODES: tuple[str, ...] = (
    "US", "GB", "DE", "FR", "BR", "JP", "IN", "CA", "MX", "ES", "IT", "KR", "AU", "NL", "SE", "PL",
    "TR", "AR", "CO", "ZA", "NG", "EG", "ID", "PH", "TH", "VN", "SA", "AE", "IE", "NZ",
)
# fmt: on

# --- Generative constants (quoted in docs/DATA.md) ----------------------------------------
WORDS_PER_TITLE_P = (0.25, 0.40, 0.25, 0.10)  # P(title has 1, 2, 3, 4 words)
ARTICLE_RATE = 0.15  # multi-word titles that start with "The"
GAME_SUFFIX_RATE = 0.4  # games whose name ends with a game word ("quest", "arena"...)
PREFIX_TITLE_RATE = 0.03  # titles that equal the first words of another ("Star" / "Star River")
EXCLUSIVE_RATE = 0.2  # videos available in exactly one country
COUNTRY_KEEP_RATE = 0.85  # otherwise each country carries the video with this probability
VIDEO_NOISE = 0.8  # |latent - genre centroid| before normalisation (latents are unit vectors)
CLUSTER_NOISE = 0.5  # cluster centroid = mix of two genre centroids + this much noise
USER_NOISE = 0.8  # user taste = cluster centroid + this much noise
LOG_POPULARITY_SD = 1.2  # log popularity ~ N(0, sd^2) per rankable entity
COUNTRY_POPULARITY_SD = 0.4  # per-country deviation of the log popularity
ACTIVITY_SD = 1.0  # users' session share ~ lognormal(0, sd^2)
INTENT_CANDIDATES = 32  # popularity-drawn candidates per intent, re-drawn by taste
INTENT_TASTE = 4.0  # P(intent = t) ∝ popularity(t) * exp(INTENT_TASTE * taste(u, t))
LATER_WORD_RATE = 0.25  # search queries that start at a later word of the title
ALT_CLICK_RATE = 0.05  # search sessions that end on another matching title liked more
RANDOM_PER_REQUEST = 2  # random available entities in each search/more_like_this impression
HISTORY_SOURCE_RATE = 0.8  # more_like_this sources taken from the user's own past plays
ENTITY_TYPE_P = (0.5, 0.3, 0.2)  # entity pages: genre, collection, person
KEYSTROKE_GAP_S = (1, 3)  # seconds between keystrokes, inclusive
COLLECTION_SIZE = (5, 30)  # videos linked to a collection, inclusive
PERSON_SIZE = (3, 15)  # videos linked to a person, inclusive
DEDUPE_ROUNDS = 3  # rounds of "a taken title name gets one more word"
NEIGHBOUR_POOL = 1000  # collections/people pick their nearest videos from a random pool
COLLECTION_WORDS = 60  # collection names use the most common title words


@dataclass(frozen=True)
class EngagementModel:
    """P(engage) = sigmoid(relevance*rel + taste*cos(user, target) + popularity*z + bias).

    ``rel`` is the task's relevance (search: query/name match in [0, 1]; more_like_this:
    cosine of the source and target latents; entity: 1 when the target is linked to the
    page, else 0; prequery: 0). ``z`` is the target's country log popularity / its sd.
    """

    relevance: float
    taste: float
    popularity: float
    bias: float


# Relevance dominates search (a full-title query gives rel = 1, i.e. +6 on the logit,
# more than any taste difference can take away); taste matters in every task.
ENGAGEMENT: dict[str, EngagementModel] = {
    "search": EngagementModel(relevance=6.0, taste=2.0, popularity=0.3, bias=-2.5),
    "prequery": EngagementModel(relevance=0.0, taste=4.0, popularity=0.4, bias=-3.2),
    "more_like_this": EngagementModel(relevance=3.0, taste=3.0, popularity=0.3, bias=-4.0),
    "entity": EngagementModel(relevance=1.5, taste=3.5, popularity=0.3, bias=-4.0),
}


def engagement_probability(
    task: str, relevance: np.ndarray, taste: np.ndarray, popularity_z: np.ndarray
) -> np.ndarray:
    """The world's true P(positive engagement) for ``task`` (see ``EngagementModel``)."""
    if task not in ENGAGEMENT:
        raise ValueError(f"task must be one of {list(ENGAGEMENT)}, got {task!r}")
    m = ENGAGEMENT[task]
    logit = m.relevance * relevance + m.taste * taste + m.popularity * popularity_z + m.bias
    return 1.0 / (1.0 + np.exp(-logit))


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and rates of a synthetic world. Sessions are per task and independent of the
    number of users, so a 1M-user world has as many log rows as a 4k-user one."""

    seed: int = 7
    n_users: int = 4000
    n_videos: int = 2000
    n_games: int = 100
    n_genres: int = 16  # at most len(GENRE_NAMES)
    n_collections: int = 40
    n_people: int = 120
    n_countries: int = 6  # the first n of COUNTRY_CODES: US GB DE FR BR JP ...
    n_clusters: int = 12  # true taste clusters of users
    taste_dim: int = 16
    # sessions per task; a search session logs one request per keystroke (~7)
    search_sessions: int = 3000
    prequery_sessions: int = 12000
    more_like_this_sessions: int = 9000
    entity_sessions: int = 7000
    impressions_per_request: int = 12  # at most this many rows per request
    typo_rate: float = 0.05  # search sessions with one substituted/dropped/doubled char
    logged_out_rate: float = 0.03  # sessions logged with user_id ""
    unknown_country_rate: float = 0.02  # sessions logged with country ""
    start_timestamp: int = 1_704_067_200  # 2024-01-01T00:00:00Z
    span_days: int = 90

    def __post_init__(self) -> None:
        minimum = {
            "seed": 0,
            "n_users": 1,
            "n_videos": 1,
            "n_games": 0,
            "n_genres": 1,
            "n_collections": 0,
            "n_people": 0,
            "n_countries": 1,
            "n_clusters": 1,
            "taste_dim": 2,
            "search_sessions": 0,
            "prequery_sessions": 0,
            "more_like_this_sessions": 0,
            "entity_sessions": 0,
            "impressions_per_request": 4,
            "start_timestamp": 0,
            "span_days": 1,
        }
        maximum = {
            "n_genres": len(GENRE_NAMES),
            "n_countries": len(COUNTRY_CODES),
            "impressions_per_request": 200,
            "span_days": 36_500,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            high = maximum.get(name)
            if value < low or (high is not None and value > high):
                bound = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ValueError(f"{name} must be {bound}, got {value}")
        for name in ("typo_rate", "logged_out_rate", "unknown_country_rate"):
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, int | float):
                raise ValueError(f"{name} must be a number, got {rate!r}")
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")

    @property
    def countries(self) -> tuple[str, ...]:
        return COUNTRY_CODES[: self.n_countries]

    @property
    def n_rankable(self) -> int:
        return self.n_videos + self.n_games

    @property
    def n_entities(self) -> int:
        return self.n_rankable + self.n_genres + self.n_collections + self.n_people


@dataclass(frozen=True)
class SyntheticWorld:
    """The generated tables plus the hidden truth behind them (for tests and diagnostics;
    a model must learn these from the log, never read them)."""

    config: WorldConfig
    catalogue: Catalogue
    log: EngagementLog
    entity_latent: np.ndarray  # (E, D) float32 unit vectors, catalogue order
    entity_log_popularity: np.ndarray  # (E,) float32; 0 for non-rankable entities
    user_taste: np.ndarray  # (U, D) float32 unit vectors; row n is user "u{n}"
    user_cluster: np.ndarray  # (U,) int64 true taste cluster
    user_country: np.ndarray  # (U,) str home country
    cluster_centroid: np.ndarray  # (K, D) float32 unit vectors

    def oracle_taste(self, log: EngagementLog) -> np.ndarray:
        """(N,) cos(user taste, target latent) per log row; NaN where the user is logged out."""
        known = log.user_id != ""
        users = np.strings.slice(log.user_id[known], 1, None).astype(np.int64)
        ids = self.catalogue.entity_id
        order = np.argsort(ids)
        targets = order[np.searchsorted(ids, log.target_entity_id[known], sorter=order)]
        out = np.full(len(log), np.nan, dtype=np.float64)
        out[known] = np.einsum(
            "nd,nd->n", self.user_taste[users], self.entity_latent[targets], dtype=np.float64
        )
        return out


def generate_world(config: WorldConfig) -> tuple[Catalogue, EngagementLog]:
    """The catalogue and the unified engagement log of the world ``config`` describes."""
    world = build_world(config)
    return world.catalogue, world.log


def build_world(config: WorldConfig) -> SyntheticWorld:
    """Generate the whole world, deterministically from ``config.seed``."""
    # One independent stream per stage: changing how one stage draws never shifts another.
    streams = np.random.SeedSequence(config.seed).spawn(8)
    rng_entities, rng_users, rng_search, rng_pre, rng_ent, rng_mlt, rng_log = (
        np.random.default_rng(s) for s in streams[:7]
    )
    entities = _Entities(config, rng_entities)
    users = _Users(config, entities, rng_users)
    sim = _Simulator(config, entities, users)
    search = sim.search(rng_search)
    prequery = sim.prequery(rng_pre)
    entity = sim.entity(rng_ent)
    # more_like_this pages start from titles the user played earlier in any other task.
    mlt = sim.more_like_this(rng_mlt, history=(search, prequery, entity))
    log = _assemble(config, entities, [search, prequery, mlt, entity], rng_log)
    return SyntheticWorld(
        config=config,
        catalogue=entities.catalogue(),
        log=log,
        entity_latent=entities.latent,
        entity_log_popularity=entities.log_pop,
        user_taste=users.taste,
        user_cluster=users.cluster,
        user_country=np.array(config.countries)[users.country],
        cluster_centroid=users.centroid,
    )


# (request index, target entity index) arrays -> relevance per row
RelevanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


# --- Small vectorised helpers -------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Gaussian noise whose expected norm per row is about ``scale``."""
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale / np.sqrt(shape[1]))


def _rowwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", a, b)


def _group_rank(keys: np.ndarray) -> np.ndarray:
    """Position of each element among the elements with the same key, in input order."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(keys)) - np.repeat(starts, counts)
    return rank


def _compact(strings: np.ndarray) -> np.ndarray:
    """The same strings in the narrowest fixed width: numpy string ops widen their result
    to the sum of their inputs' widths, which would multiply the log's memory."""
    width = int(np.strings.str_len(strings).max()) if len(strings) else 0
    return strings.astype(f"<U{max(width, 1)}")


def _join_tokens(tokens: np.ndarray) -> np.ndarray:
    """(N, T) tokens, "" as padding after the last token -> (N,) space-joined strings."""
    out = tokens[:, 0]
    for j in range(1, tokens.shape[1]):
        col = tokens[:, j]
        out = np.where(col != "", np.strings.add(np.strings.add(out, " "), col), out)
    return _compact(out)


def _labels_by_code(codes: np.ndarray, label_of: dict[int, str] | None = None) -> np.ndarray:
    """Map integer codes to strings through their unique values (few), not per element."""
    unique, inverse = np.unique(codes, return_inverse=True)
    names = [label_of[int(c)] if label_of is not None else str(c) for c in unique]
    return np.array(names, dtype=str)[inverse]


def _choose_weighted(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """(S, M) non-negative weights -> (S,) column index drawn per row ∝ weight."""
    cdf = np.cumsum(weights, axis=1)
    r = rng.random(len(weights)) * cdf[:, -1]
    return np.minimum((cdf < r[:, None]).sum(axis=1), weights.shape[1] - 1)


# --- Entities -----------------------------------------------------------------------------


class _Entities:
    """Every entity in catalogue order: videos, games, genres, collections, people."""

    def __init__(self, cfg: WorldConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        nv, ng, nr = cfg.n_videos, cfg.n_games, cfg.n_rankable
        d, g = cfg.taste_dim, cfg.n_genres
        self.n = cfg.n_entities
        self.genre_start = nr
        self.collection_start = nr + g
        self.person_start = nr + g + cfg.n_collections
        self.genre_centroid = _unit(rng.standard_normal((g, d), dtype=np.float32))

        # Rankables: a primary genre (genres differ in size), latent near its centroid.
        genre_share = rng.dirichlet(np.full(g, 2.0))
        self.primary_genre = rng.choice(g, size=nr, p=genre_share)
        rank_latent = _unit(
            self.genre_centroid[self.primary_genre] + _noise(rng, (nr, d), VIDEO_NOISE)
        )
        # 0-2 extra genres: the ones (other than the primary) nearest to the title's latent.
        by_closeness = np.argsort(-(rank_latent @ self.genre_centroid.T), axis=1, kind="stable")
        others = by_closeness[by_closeness != self.primary_genre[:, None]].reshape(nr, g - 1)
        n_extra = rng.choice(3, size=nr, p=(0.5, 0.35, 0.15))
        self.genre_slots = np.full((nr, 3), -1, dtype=np.int64)
        self.genre_slots[:, 0] = self.primary_genre
        for k in range(1, min(3, g)):
            self.genre_slots[:, k] = np.where(n_extra >= k, others[:, k - 1], -1)

        self.log_pop = np.zeros(self.n, dtype=np.float32)
        self.log_pop[:nr] = rng.normal(0.0, LOG_POPULARITY_SD, nr)
        c = cfg.n_countries
        self.country_log_pop = np.zeros((c, self.n), dtype=np.float32)
        self.country_log_pop[:, :nr] = self.log_pop[:nr] + rng.normal(
            0.0, COUNTRY_POPULARITY_SD, (c, nr)
        ).astype(np.float32)
        self.year = np.zeros(self.n, dtype=np.int32)
        self.year[:nv] = np.clip(2024 - np.floor(rng.exponential(12.0, nv)), 1930, 2024)
        self.year[nv:nr] = np.clip(2024 - np.floor(rng.exponential(8.0, ng)), 1985, 2024)

        # Availability: videos in a subset of countries; everything else everywhere.
        exclusive = rng.random(nv) < EXCLUSIVE_RATE
        country_p = _country_weights(cfg.n_countries)
        home = rng.choice(c, size=nv, p=country_p)
        video_mask = rng.random((nv, c)) < COUNTRY_KEEP_RATE
        video_mask[exclusive] = False
        video_mask[np.arange(nv), home] |= exclusive | ~video_mask.any(axis=1)
        self.available = np.zeros((c, self.n), dtype=bool)  # rankable AND available
        self.available[:, :nv] = video_mask.T
        self.available[:, nv:nr] = True
        self.video_mask = video_mask

        self._name_rankables(rng)
        self.latent = np.zeros((self.n, d), dtype=np.float32)
        self.latent[:nr] = rank_latent
        self.latent[self.genre_start : self.collection_start] = self.genre_centroid
        self._link_entities(rng)
        self.ids = np.concatenate(
            [
                np.strings.add("v", np.arange(nv).astype(str)),
                np.strings.add("g", np.arange(ng).astype(str)),
                np.array([f"genre:{_slug(name)}" for name in GENRE_NAMES[:g]], dtype=str),
                np.strings.add("col:", np.arange(cfg.n_collections).astype(str)),
                np.strings.add("person:", np.arange(cfg.n_people).astype(str)),
            ]
        )

    @property
    def popularity_z(self) -> np.ndarray:
        """(C, E) country log popularity in units of its sd: the model's popularity term."""
        sd = np.sqrt(LOG_POPULARITY_SD**2 + COUNTRY_POPULARITY_SD**2)
        return self.country_log_pop / np.float32(sd)

    def _name_rankables(self, rng: np.random.Generator) -> None:
        cfg = self.cfg
        n, nv = cfg.n_rankable, cfg.n_videos
        vocab = np.array(TITLE_WORDS)
        word_p = 1.0 / (np.arange(len(vocab)) + 8.0)
        n_words = rng.choice(4, size=n, p=WORDS_PER_TITLE_P) + 1
        word_idx = rng.choice(len(vocab), size=(n, 4), p=word_p / word_p.sum())
        has_the = (n_words >= 2) & (rng.random(n) < ARTICLE_RATE)
        # "Star" next to "Star River": a title that is the first words of another one.
        multi = np.flatnonzero(n_words >= 2)
        n_dup = min(len(multi), int(PREFIX_TITLE_RATE * n))
        if n_dup > 0:
            donors = rng.permutation(multi)[:n_dup]
            others = np.setdiff1d(np.arange(n), donors)
            receivers = rng.choice(others, size=min(n_dup, len(others)), replace=False)
            donors = donors[: len(receivers)]
            word_idx[receivers] = word_idx[donors]
            n_words[receivers] = rng.integers(1, n_words[donors])
            has_the[receivers] = has_the[donors] & (n_words[receivers] >= 2)
        games = np.arange(n) >= nv
        suffix_idx = np.where(
            games & (rng.random(n) < GAME_SUFFIX_RATE), rng.integers(0, len(GAME_SUFFIXES), n), -1
        )
        suffix = np.where(suffix_idx >= 0, np.array(GAME_SUFFIXES)[suffix_idx], "")
        word_choice = word_p / word_p.sum()
        # Names are unique: a taken name gets one more word (a few rounds), and what is
        # still taken after that becomes a sequel ("Star River 2"). The rounds compare word
        # indices, which is much cheaper than comparing joined strings.
        for _ in range(DEDUPE_ROUNDS):
            words = np.where(np.arange(4) < n_words[:, None], word_idx, -1)
            key = np.column_stack([has_the, words, suffix_idx])
            copy_no = _group_rank(np.unique(key, axis=0, return_inverse=True)[1].ravel())
            grow = np.flatnonzero((copy_no > 0) & (n_words < 4))
            if len(grow) == 0:
                break
            word_idx[grow, n_words[grow]] = rng.choice(len(vocab), size=len(grow), p=word_choice)
            n_words[grow] += 1
        tokens = _title_tokens(vocab, word_idx, n_words, has_the, suffix)
        n_tokens = (tokens != "").sum(axis=1)
        base = _join_tokens(tokens)
        copy_no = _group_rank(np.unique(base, return_inverse=True)[1])
        dup = copy_no > 0
        number = (copy_no + 1).astype(str)
        tokens[dup, n_tokens[dup]] = number[dup]
        self.tokens = tokens  # (R, 7) lowercase name tokens, "" padding
        self.start_tokens = n_tokens  # a query may start at any of these (not the number)
        # equals app.core.context.normalise_query(display name)
        self.name_norm = _compact(
            np.where(dup, np.strings.add(np.strings.add(base, " "), number), base)
        )
        self.display = _join_tokens(np.where(tokens != "", np.strings.capitalize(tokens), ""))
        # char offset of token j in the normalised name
        lengths = np.strings.str_len(tokens) + (tokens != "")
        self.token_offset = np.cumsum(lengths, axis=1) - lengths

    def _link_entities(self, rng: np.random.Generator) -> None:
        cfg = self.cfg
        nv, d = cfg.n_videos, cfg.taste_dim
        # genre -> every video carrying it
        slots = self.genre_slots[:nv]
        has = slots >= 0
        videos = np.broadcast_to(np.arange(nv)[:, None], slots.shape)[has]
        src = [self.genre_start + slots[has]]
        dst = [videos]
        # collections: 5-30 videos nearest to an anchor (a random video's latent + noise)
        nc = cfg.n_collections
        anchor = rng.integers(0, nv, nc)
        col_latent = _unit(self.latent[anchor] + _noise(rng, (nc, d), 0.5))
        size = rng.integers(COLLECTION_SIZE[0], COLLECTION_SIZE[1] + 1, nc)
        s, t = self._nearest_videos(col_latent, size, rng)
        src.append(self.collection_start + s)
        dst.append(t)
        # people: 3-15 videos near a genre-flavoured latent (an actor's typical roles)
        npp = cfg.n_people
        person_genre = rng.choice(cfg.n_genres, npp)
        person_latent = _unit(self.genre_centroid[person_genre] + _noise(rng, (npp, d), 0.7))
        size = rng.integers(PERSON_SIZE[0], PERSON_SIZE[1] + 1, npp)
        s, t = self._nearest_videos(person_latent, size, rng, pool=max(50, NEIGHBOUR_POOL // 5))
        src.append(self.person_start + s)
        dst.append(t)
        self.latent[self.collection_start : self.person_start] = col_latent
        self.latent[self.person_start :] = person_latent
        self.link_src = np.concatenate(src).astype(np.int64)
        self.link_dst = np.concatenate(dst).astype(np.int64)
        counts = np.bincount(self.link_src, minlength=self.n)
        order = np.lexsort((self.link_dst, self.link_src))
        self.link_src, self.link_dst = self.link_src[order], self.link_dst[order]
        self.link_indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
        self.link_keys = self.link_src * self.n + self.link_dst  # sorted: membership tests

        # "Midnight Classics": a common title word and a collection word
        common_words = np.strings.capitalize(np.array(TITLE_WORDS[:COLLECTION_WORDS]))
        word = common_words[rng.integers(0, len(common_words), nc)]
        kind = np.array(COLLECTION_SUFFIXES)[rng.integers(0, len(COLLECTION_SUFFIXES), nc)]
        self.collection_names = np.strings.add(np.strings.add(word, " "), kind)
        first = np.array(FIRST_NAMES)[rng.integers(0, len(FIRST_NAMES), npp)]
        last = np.array(LAST_NAMES)[rng.integers(0, len(LAST_NAMES), npp)]
        self.person_names = np.strings.add(np.strings.add(first, " "), last)

    def _nearest_videos(
        self,
        anchors: np.ndarray,
        size: np.ndarray,
        rng: np.random.Generator,
        pool: int = NEIGHBOUR_POOL,
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each anchor, its ``size`` nearest videos among a random pool of videos."""
        nv = self.cfg.n_videos
        if len(anchors) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        video_latent = self.latent[:nv]
        srcs, dsts = [], []
        chunk = max(1, 2**22 // (min(pool, nv) * self.cfg.taste_dim))  # ~16 MiB of floats
        for lo in range(0, len(anchors), chunk):
            a = anchors[lo : lo + chunk]
            if nv <= pool:
                cand = np.broadcast_to(np.arange(nv), (len(a), nv))
            else:
                cand = np.sort(rng.integers(0, nv, (len(a), pool)), axis=1)
            sims = np.einsum("ad,apd->ap", a, video_latent[cand])
            sims[:, 1:][cand[:, 1:] == cand[:, :-1]] = -np.inf  # a video at most once
            k = min(int(size.max()), cand.shape[1])
            best = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            keep = (np.arange(k)[None, :] < size[lo : lo + chunk, None]) & np.isfinite(
                np.take_along_axis(sims, best, 1)
            )
            rows = np.broadcast_to(np.arange(lo, lo + len(a))[:, None], best.shape)
            srcs.append(rows[keep])
            dsts.append(np.take_along_axis(cand, best, 1)[keep])
        return np.concatenate(srcs), np.concatenate(dsts)

    def linked(self, entity: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Bool per pair: is ``targets[i]`` linked to ``entity[i]``?"""
        keys = entity * self.n + targets
        pos = np.minimum(np.searchsorted(self.link_keys, keys), max(len(self.link_keys) - 1, 0))
        return (len(self.link_keys) > 0) & (self.link_keys[pos] == keys)

    def catalogue(self) -> Catalogue:
        cfg = self.cfg
        nv, ng = cfg.n_videos, cfg.n_games
        ids = self.ids
        n_other = self.n - cfg.n_rankable
        types = np.repeat(
            np.array(["video", "game", "genre", "collection", "person"]),
            [nv, ng, cfg.n_genres, cfg.n_collections, cfg.n_people],
        )
        names = np.concatenate(
            [
                self.display,
                np.array(GENRE_NAMES[: cfg.n_genres]),
                self.collection_names,
                self.person_names,
            ]
        ).astype(str)
        # genre and country strings go through their few distinct combinations
        genre_code = (self.genre_slots + 1) @ np.array([1, 64, 64 * 64])
        genre_of = {
            int(code): "|".join(
                _slug(GENRE_NAMES[i - 1]) for i in (code % 64, code // 64 % 64, code // 4096) if i
            )
            for code in np.unique(genre_code)
        }
        country_code = self.video_mask.astype(np.int64) @ (1 << np.arange(cfg.n_countries))
        countries_of = {
            int(code): "|".join(cc for i, cc in enumerate(cfg.countries) if code >> i & 1)
            for code in np.unique(country_code)
        }
        genres = np.concatenate([_labels_by_code(genre_code, genre_of), np.full(n_other, "")])
        countries = np.concatenate(
            [
                _labels_by_code(country_code, countries_of),
                np.full(self.n - nv, ""),
            ]
        )
        return Catalogue(
            entity_id=ids,
            entity_type=types,
            display_name=names,
            year=self.year,
            genres=genres,
            countries=countries,
            link_source=ids[self.link_src],
            link_target=ids[self.link_dst],
        )


def _title_tokens(
    vocab: np.ndarray,
    word_idx: np.ndarray,
    n_words: np.ndarray,
    has_the: np.ndarray,
    suffix: np.ndarray,
) -> np.ndarray:
    """(N, 7) lowercase tokens: ["the"] + 1-4 words + [game word], packed left, "" padding
    (the last column is left free for a sequel number)."""
    n = len(n_words)
    tokens = np.full((n, 7), "", dtype=f"<U{max(len(w) for w in vocab.tolist())}")
    tokens[has_the, 0] = "the"
    for j in range(4):
        present = n_words > j
        tokens[present, j + 1] = vocab[word_idx[present, j]]
    tokens[:, 5] = suffix
    return np.take_along_axis(tokens, np.argsort(tokens == "", axis=1, kind="stable"), 1)


def _country_weights(n_countries: int) -> np.ndarray:
    """Share of members (and of exclusive titles) per country: ~ 1/rank^0.7."""
    w = 1.0 / np.arange(1, n_countries + 1) ** 0.7
    return w / w.sum()


def _slug(name: str) -> str:
    return name.lower().replace("-", "_").replace(" ", "_")


# --- Users --------------------------------------------------------------------------------


class _Users:
    """Taste = a cluster centroid (a mix of two genres) + personal noise; a home country."""

    def __init__(self, cfg: WorldConfig, entities: _Entities, rng: np.random.Generator) -> None:
        k, d, n = cfg.n_clusters, cfg.taste_dim, cfg.n_users
        pair = rng.integers(0, cfg.n_genres, (k, 2))
        self.centroid = _unit(
            entities.genre_centroid[pair[:, 0]]
            + entities.genre_centroid[pair[:, 1]]
            + _noise(rng, (k, d), CLUSTER_NOISE)
        )
        cluster_share = rng.dirichlet(np.full(k, 3.0))
        self.cluster = rng.choice(k, size=n, p=cluster_share).astype(np.int64)
        self.taste = _unit(self.centroid[self.cluster] + _noise(rng, (n, d), USER_NOISE))
        self.country = rng.choice(cfg.n_countries, size=n, p=_country_weights(cfg.n_countries))
        activity = rng.lognormal(0.0, ACTIVITY_SD, n)
        self.activity_cdf = np.cumsum(activity) / activity.sum()


@dataclass
class _Sessions:
    user: np.ndarray  # (S,) true user index (also for logged-out sessions)
    time: np.ndarray  # (S,) int64 start timestamp
    country: np.ndarray  # (S,) home country index
    user_visible: np.ndarray  # (S,) bool: False = logged out, user_id ""
    country_visible: np.ndarray  # (S,) bool: False = country "" in the log

    def __len__(self) -> int:
        return len(self.user)

    def take(self, keep: np.ndarray) -> _Sessions:
        return _Sessions(*(getattr(self, f.name)[keep] for f in fields(self)))


@dataclass
class _Block:
    """One task's requests and impressed rows, before ids and strings are assigned."""

    task: str
    sessions: _Sessions
    request_session: np.ndarray  # (Q,) session of each request
    request_time: np.ndarray  # (Q,) int64
    query: np.ndarray  # (Q,) str raw query
    source: np.ndarray  # (Q,) entity index, -1 = none
    row_request: np.ndarray  # (N,) request of each row
    row_target: np.ndarray  # (N,) entity index
    row_label: np.ndarray  # (N,) int8


class _Sampler:
    """Draws rankable entities available in a country, ∝ popularity or uniformly."""

    def __init__(self, members_by_country: list[np.ndarray], weights: np.ndarray) -> None:
        self.members = members_by_country
        self.cdf = []
        for c, members in enumerate(members_by_country):
            w = np.exp(weights[c, members].astype(np.float64))
            self.cdf.append(np.cumsum(w) / w.sum() if len(w) else w)

    def draw(
        self, rng: np.random.Generator, country: np.ndarray, k: int, popular: bool
    ) -> np.ndarray:
        """(S, k) entity indices (-1 where a country has nothing to draw)."""
        out = np.full((len(country), k), -1, dtype=np.int64)
        for c, members in enumerate(self.members):
            rows = np.flatnonzero(country == c)
            if len(rows) == 0 or len(members) == 0:
                continue
            if popular:
                pos = np.searchsorted(self.cdf[c], rng.random((len(rows), k)), side="right")
                pos = np.minimum(pos, len(members) - 1)
            else:
                pos = rng.integers(0, len(members), (len(rows), k))
            out[rows] = members[pos]
        return out


def _impressions(slots: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, K) slot entities (-1 = empty), in priority order -> (request, target) rows:
    duplicates dropped (first slot wins), at most ``cap`` rows per request."""
    q_count, k = slots.shape
    req = np.repeat(np.arange(q_count), k)
    ent = slots.ravel()
    pos = np.tile(np.arange(k), q_count)
    keep = ent >= 0
    req, ent, pos = req[keep], ent[keep], pos[keep]
    if len(req) == 0:
        return req, ent
    order = np.lexsort((pos, ent, req))
    req, ent, pos = req[order], ent[order], pos[order]
    first = np.r_[True, (req[1:] != req[:-1]) | (ent[1:] != ent[:-1])]
    req, ent, pos = req[first], ent[first], pos[first]
    order = np.lexsort((pos, req))
    req, ent = req[order], ent[order]
    within = _group_rank(req)
    return req[within < cap], ent[within < cap]


# --- Sessions of every task ---------------------------------------------------------------


class _Simulator:
    """Draws the sessions of every task from one world (entities + users)."""

    def __init__(self, cfg: WorldConfig, entities: _Entities, users: _Users) -> None:
        self.cfg = cfg
        self.ent = entities
        self.users = users
        rankable = [np.flatnonzero(entities.available[c]) for c in range(cfg.n_countries)]
        videos = [m[m < cfg.n_videos] for m in rankable]
        self.rankable = _Sampler(rankable, entities.country_log_pop)
        self.videos = _Sampler(videos, entities.country_log_pop)
        self.pop_z = entities.popularity_z
        self.sorted_names = np.sort(entities.name_norm)
        self.r = cfg.impressions_per_request

    def _sessions(self, rng: np.random.Generator, n: int) -> _Sessions:
        u = np.searchsorted(self.users.activity_cdf, rng.random(n), side="right")
        user = np.minimum(u, self.cfg.n_users - 1).astype(np.int64)
        span = self.cfg.span_days * 86_400
        start = self.cfg.start_timestamp + rng.integers(0, span, n)
        return _Sessions(
            user=user,
            time=start.astype(np.int64),
            country=self.users.country[user],
            user_visible=rng.random(n) >= self.cfg.logged_out_rate,
            country_visible=rng.random(n) >= self.cfg.unknown_country_rate,
        )

    def _taste(self, user: np.ndarray, target: np.ndarray) -> np.ndarray:
        return _rowwise_dot(self.users.taste[user], self.ent.latent[target])

    def _probability(
        self,
        task: str,
        s: _Sessions,
        row_session: np.ndarray,
        target: np.ndarray,
        relevance: np.ndarray,
    ) -> np.ndarray:
        user = s.user[row_session]
        taste = self._taste(user, target)
        pop = self.pop_z[s.country[row_session], target]
        return engagement_probability(task, relevance, taste, pop)

    def _intent(self, rng: np.random.Generator, s: _Sessions, sampler: _Sampler) -> np.ndarray:
        """What each session's user wants: popularity-drawn candidates re-drawn by taste."""
        cand = sampler.draw(rng, s.country, INTENT_CANDIDATES, popular=True)
        taste = np.einsum(
            "sd,smd->sm", self.users.taste[s.user], self.ent.latent[np.maximum(cand, 0)]
        )
        w = np.where(
            cand >= 0, np.exp(INTENT_TASTE * (taste - taste.max(axis=1, keepdims=True))), 0
        )
        w[w.sum(axis=1) == 0, 0] = 1.0
        return cand[np.arange(len(s)), _choose_weighted(rng, w)]

    def _single_request_block(
        self,
        task: str,
        s: _Sessions,
        slots: np.ndarray,
        source: np.ndarray,
        relevance_of: RelevanceFn,
        rng: np.random.Generator,
    ) -> _Block:
        """Recommendation tasks: one request per session, labels drawn independently."""
        req, target = _impressions(slots, self.r)
        rel = relevance_of(req, target)
        p = self._probability(task, s, req, target, rel)
        return _Block(
            task=task,
            sessions=s,
            request_session=np.arange(len(s)),
            request_time=s.time,
            query=np.full(len(s), ""),
            source=source,
            row_request=req,
            row_target=target,
            row_label=(rng.random(len(p)) < p).astype(np.int8),
        )

    # -- prequery
    def prequery(self, rng: np.random.Generator) -> _Block:
        s = self._sessions(rng, self.cfg.prequery_sessions)
        n_random = self.r // 3
        slots = np.concatenate(
            [
                self.rankable.draw(rng, s.country, self.r - n_random, popular=True),
                self.rankable.draw(rng, s.country, n_random, popular=False),
            ],
            axis=1,
        )

        def no_relevance(req: np.ndarray, target: np.ndarray) -> np.ndarray:
            return np.zeros(len(req))

        return self._single_request_block(
            "prequery", s, slots, np.full(len(s), -1), no_relevance, rng
        )

    # -- entity
    def entity(self, rng: np.random.Generator) -> _Block:
        cfg, ent = self.cfg, self.ent
        s = self._sessions(rng, cfg.entity_sessions)
        degree = np.diff(ent.link_indptr)
        starts = (ent.genre_start, ent.collection_start, ent.person_start, ent.n)
        pools = [np.flatnonzero(degree[a:b] > 0) + a for a, b in itertools.pairwise(starts)]
        kind_p = np.array(
            [p if len(pool) else 0.0 for p, pool in zip(ENTITY_TYPE_P, pools, strict=True)]
        )
        kind = rng.choice(3, size=len(s), p=kind_p / kind_p.sum())
        # each page type: 8 random pages of that type, the one the user likes best is likelier
        cand = np.zeros((len(s), 8), dtype=np.int64)
        for t, pool in enumerate(pools):
            rows = np.flatnonzero(kind == t)
            cand[rows] = pool[rng.integers(0, max(len(pool), 1), (len(rows), 8))]
        taste = np.einsum("sd,smd->sm", self.users.taste[s.user], ent.latent[cand])
        w = np.exp(INTENT_TASTE * (taste - taste.max(axis=1, keepdims=True)))
        source = cand[np.arange(len(s)), _choose_weighted(rng, w)]
        # linked videos (uniform among the page's links) then a few random ones
        n_random = max(1, self.r // 4)
        n_linked = self.r - n_random
        deg = degree[source]
        linked = ent.link_dst[
            ent.link_indptr[source][:, None]
            + np.floor(rng.random((len(s), n_linked)) * deg[:, None]).astype(np.int64)
        ]
        linked = np.where(ent.available[s.country[:, None], linked], linked, -1)
        slots = np.concatenate(
            [linked, self.videos.draw(rng, s.country, n_random, popular=False)], axis=1
        )

        def membership(req: np.ndarray, target: np.ndarray) -> np.ndarray:
            return ent.linked(source[req], target).astype(np.float64)

        return self._single_request_block("entity", s, slots, source, membership, rng)

    # -- more_like_this
    def more_like_this(self, rng: np.random.Generator, history: tuple[_Block, ...]) -> _Block:
        cfg, ent = self.cfg, self.ent
        s = self._sessions(rng, cfg.more_like_this_sessions)
        source = self._past_play(rng, s, history)
        fallback = self.videos.draw(rng, s.country, 1, popular=True)[:, 0]
        use_fallback = (source < 0) | (rng.random(len(s)) >= HISTORY_SOURCE_RATE)
        source = np.where(use_fallback, fallback, source)
        has_source = source >= 0
        s = s.take(has_source)
        source = source[has_source]
        # a pool sharing the source's genre plus popular titles; the most similar win
        pool_size = 4 * self.r
        genre_entity = ent.genre_start + ent.primary_genre[source]
        deg = np.diff(ent.link_indptr)[genre_entity]
        same_genre = ent.link_dst[
            ent.link_indptr[genre_entity][:, None]
            + np.floor(rng.random((len(s), 3 * pool_size // 4)) * deg[:, None]).astype(np.int64)
        ]
        popular = self.videos.draw(rng, s.country, pool_size // 4, popular=True)
        pool = np.sort(np.concatenate([same_genre, popular], axis=1), axis=1)
        sims = np.einsum("sd,spd->sp", ent.latent[source], ent.latent[np.maximum(pool, 0)])
        bad = (pool < 0) | (pool == source[:, None])
        bad |= ~ent.available[s.country[:, None], np.maximum(pool, 0)]
        bad[:, 1:] |= pool[:, 1:] == pool[:, :-1]
        sims[bad] = -np.inf
        n_similar = self.r - RANDOM_PER_REQUEST
        best = np.argsort(-sims, axis=1, kind="stable")[:, :n_similar]
        similar = np.where(
            np.isfinite(np.take_along_axis(sims, best, 1)), np.take_along_axis(pool, best, 1), -1
        )
        randoms = self.rankable.draw(rng, s.country, RANDOM_PER_REQUEST, popular=False)
        randoms = np.where(randoms == source[:, None], -1, randoms)
        slots = np.concatenate([similar, randoms], axis=1)

        def similarity(req: np.ndarray, target: np.ndarray) -> np.ndarray:
            return _rowwise_dot(ent.latent[source[req]], ent.latent[target]).astype(np.float64)

        return self._single_request_block("more_like_this", s, slots, source, similarity, rng)

    def _past_play(
        self, rng: np.random.Generator, s: _Sessions, history: tuple[_Block, ...]
    ) -> np.ndarray:
        """A random video the session's user played before the session (-1 when none)."""
        users, times, targets = [], [], []
        for block in history:
            pos = (block.row_label == 1) & (block.row_target < self.cfg.n_videos)
            sess = block.request_session[block.row_request[pos]]
            users.append(block.sessions.user[sess])
            times.append(block.request_time[block.row_request[pos]])
            targets.append(block.row_target[pos])
        user, when, target = (np.concatenate(x).astype(np.int64) for x in (users, times, targets))
        key = user * (1 << 40) + (when - self.cfg.start_timestamp)  # (user, time) order
        order = np.argsort(key, kind="stable")
        key, target = key[order], target[order]
        lo = np.searchsorted(key, s.user * (1 << 40))
        hi = np.searchsorted(key, s.user * (1 << 40) + (s.time - self.cfg.start_timestamp))
        n_past = hi - lo
        if len(target) == 0:
            return np.full(len(s), -1, dtype=np.int64)
        pick = lo + np.floor(rng.random(len(s)) * n_past).astype(np.int64)
        return np.where(n_past > 0, target[np.minimum(pick, max(len(target) - 1, 0))], -1)

    # -- search
    def search(self, rng: np.random.Generator) -> _Block:
        cfg, ent = self.cfg, self.ent
        s = self._sessions(rng, cfg.search_sessions)
        n_s = len(s)
        target = self._intent(rng, s, self.rankable)
        ok = target >= 0
        s = s.take(ok)
        target, n_s = target[ok], int(ok.sum())

        # What the user types: the name from its first word, or (25%) from a later word,
        # for 2..all of its characters. Nobody stops typing on another title's exact name
        # ("star" when they want "Star River"): they type on, so that an exact title query
        # means that title. A later-word start that is another title's name starts at the
        # first word instead.
        typed_text, typed_len = self.typed_query(rng, target)

        # Every keystroke from the 2nd character on is its own request.
        first_len = np.minimum(2, typed_len)
        n_keys = typed_len - first_len + 1
        req_session = np.repeat(np.arange(n_s), n_keys)
        within = np.arange(len(req_session)) - np.repeat(np.cumsum(n_keys) - n_keys, n_keys)
        query = np.strings.slice(typed_text[req_session], 0, first_len[req_session] + within)
        gaps = rng.integers(KEYSTROKE_GAP_S[0], KEYSTROKE_GAP_S[1] + 1, len(req_session))
        gaps[within == 0] = 0
        elapsed = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[np.cumsum(n_keys) - n_keys], n_keys)
        req_time = s.time[req_session] + elapsed

        # The naive logging policy: titles with a token starting with the last typed token,
        # most popular first; the intended title when it matches; two random titles.
        unique_q, q_inverse = np.unique(query, return_inverse=True)
        q_norm = np.array([normalise_query(q) for q in unique_q.tolist()], dtype=str)
        q_last = np.array([(tokenize(q) or [""])[-1] for q in q_norm.tolist()], dtype=str)
        last = q_last[q_inverse]
        country = s.country[req_session]
        top = self._prefix_matches(last, country)  # (Q, r - RANDOM_PER_REQUEST)
        t_req = target[req_session]
        target_shown = self._token_prefix_match(t_req, last)
        slots = np.concatenate(
            [
                np.where(target_shown, t_req, -1)[:, None],
                top,
                self.rankable.draw(rng, country, RANDOM_PER_REQUEST, popular=False),
            ],
            axis=1,
        )
        row_req, row_target = _impressions(slots, self.r)

        # The session ends on the final keystroke: play the intended title with the
        # engagement probability, or (rarely) another matching title the user likes more.
        final_req = np.cumsum(n_keys) - 1
        final_q = q_norm[q_inverse[final_req]]
        rel = search_relevance(final_q, ent.name_norm[target], ent.tokens[target])
        p_play = self._probability("search", s, np.arange(n_s), target, rel)
        played = np.where(target_shown[final_req] & (rng.random(n_s) < p_play), target, -1)
        alt = self._preferred_alternative(s, top[final_req], target)
        switch = (
            (alt >= 0) & (rng.random(n_s) < ALT_CLICK_RATE) & (final_q != ent.name_norm[target])
        )
        played = np.where(switch, alt, played)
        # Attribution: every keystroke of the session whose impression showed the title.
        label = (row_target == played[req_session[row_req]]) & (row_target >= 0)
        return _Block(
            task="search",
            sessions=s,
            request_session=req_session,
            request_time=req_time.astype(np.int64),
            query=query,
            source=np.full(len(req_session), -1),
            row_request=row_req,
            row_target=row_target,
            row_label=label.astype(np.int8),
        )

    def typed_query(
        self, rng: np.random.Generator, target: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """What members type when they want ``target`` (see ``search``): the text of the
        final keystroke, typos included, and its length."""
        ent, n = self.ent, len(target)
        name = ent.name_norm[target]
        n_start = ent.start_tokens[target]
        later = (rng.random(n) < LATER_WORD_RATE) & (n_start >= 2)
        start_word = np.where(later, 1 + np.floor(rng.random(n) * (n_start - 1)), 0)
        offset = ent.token_offset[target, start_word.astype(np.int64)]
        offset = np.where(self._is_title(np.strings.slice(name, offset, None)) & later, 0, offset)
        full = np.strings.slice(name, offset, None)
        full_len = np.strings.str_len(full).astype(np.int64)
        shortest = np.minimum(2, full_len)
        typed = shortest + np.floor(rng.random(n) * (full_len - shortest + 1)).astype(np.int64)
        for _ in range(DEDUPE_ROUNDS):
            stop = np.strings.rstrip(np.strings.slice(full, 0, typed))
            on_other = self._is_title(stop) & (stop != name) & (typed < full_len)
            step = 1 + np.floor(rng.random(n) * (full_len - typed)).astype(np.int64)
            typed = np.where(on_other, typed + step, typed)
        stop = np.strings.rstrip(np.strings.slice(full, 0, typed))
        typed = np.where(self._is_title(stop) & (stop != name), full_len, typed)
        return self._with_typos(rng, full, typed)

    def _is_title(self, normalised: np.ndarray) -> np.ndarray:
        """Bool per string: is it the exact normalised name of some title?"""
        pos = np.searchsorted(self.sorted_names, normalised)
        return self.sorted_names[np.minimum(pos, len(self.sorted_names) - 1)] == normalised

    def _with_typos(
        self, rng: np.random.Generator, full: np.ndarray, typed: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply one typo (substitute, drop or double a character) to ``typo_rate`` of the
        typed strings, after the first character. Returns the typed texts and lengths."""
        n = len(full)
        text = np.strings.slice(full, 0, typed)
        has = (rng.random(n) < self.cfg.typo_rate) & (typed >= 2)
        kind = rng.integers(0, 3, n)  # 0 substitute, 1 drop, 2 double
        pos = 1 + np.floor(rng.random(n) * np.maximum(typed - 1, 1)).astype(np.int64)
        pos = np.minimum(pos, np.maximum(typed - 1, 0))
        head = np.strings.slice(full, 0, pos)
        char = np.strings.slice(full, pos, pos + 1)
        tail = np.strings.slice(full, pos + 1, typed)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        sub = letters[rng.integers(0, 26, n)]
        sub = np.where(sub == char, letters[(np.searchsorted(letters, sub) + 1) % 26], sub)
        variants = (
            np.strings.add(np.strings.add(head, sub), tail),
            np.strings.add(head, tail),
            np.strings.add(np.strings.add(np.strings.add(head, char), char), tail),
        )
        typo_text = np.where(kind == 0, variants[0], np.where(kind == 1, variants[1], variants[2]))
        out = _compact(np.where(has, typo_text, text))
        return out, np.strings.str_len(out).astype(np.int64)

    def _token_prefix_match(self, entity: np.ndarray, last: np.ndarray) -> np.ndarray:
        tokens = self.ent.tokens[entity]
        hit = np.zeros(len(entity), dtype=bool)
        for j in range(tokens.shape[1]):
            hit |= (tokens[:, j] != "") & np.strings.startswith(tokens[:, j], last)
        return hit & (last != "")

    def _prefix_matches(self, last: np.ndarray, country: np.ndarray) -> np.ndarray:
        """(Q, k) the k most popular titles available in the request's country with a name
        token starting with ``last`` (-1 padding)."""
        ent, cfg = self.ent, self.cfg
        k = self.r - RANDOM_PER_REQUEST
        tokens = ent.tokens
        flat = tokens.ravel()
        owner = np.repeat(np.arange(cfg.n_rankable), tokens.shape[1])
        keep = flat != ""
        flat, owner = flat[keep], owner[keep]
        order = np.argsort(flat, kind="stable")
        flat, owner = flat[order], owner[order]
        unique_last, inverse = np.unique(last, return_inverse=True)
        lo = np.searchsorted(flat, unique_last, side="left")
        hi = np.searchsorted(flat, np.strings.add(unique_last, "\U0010ffff"), side="left")
        table = np.full((len(unique_last), cfg.n_countries, k), -1, dtype=np.int64)
        for i in range(len(unique_last)):
            if hi[i] == lo[i] or unique_last[i] == "":
                continue
            found = np.unique(owner[lo[i] : hi[i]])
            found = found[np.argsort(-ent.log_pop[found], kind="stable")]
            avail = ent.available[:, found]  # (C, n)
            rank = np.cumsum(avail, axis=1) - 1
            c_idx, pos = np.nonzero(avail & (rank < k))
            table[i, c_idx, rank[c_idx, pos]] = found[pos]
        return table[inverse, country]

    def _preferred_alternative(
        self, s: _Sessions, cand: np.ndarray, target: np.ndarray
    ) -> np.ndarray:
        """Per session: among ``cand`` (S, k), the policy's matches shown on the final
        keystroke, the title the user likes most if they like it more than their intended
        title (-1 otherwise)."""
        valid = (cand >= 0) & (cand != target[:, None])
        taste = np.einsum(
            "sd,skd->sk", self.users.taste[s.user], self.ent.latent[np.maximum(cand, 0)]
        )
        taste[~valid] = -np.inf
        best = np.argmax(taste, axis=1)
        best_taste = taste[np.arange(len(s)), best]
        prefer = np.isfinite(best_taste) & (best_taste > self._taste(s.user, target))
        return np.where(prefer, cand[np.arange(len(s)), best], -1)


def search_relevance(query: np.ndarray, name: np.ndarray, name_tokens: np.ndarray) -> np.ndarray:
    """Text relevance in [0, 1] of normalised queries to normalised names (pairwise).

    1 for the exact full name; 0.6 + 0.3*len(q)/len(name) when the name starts with the
    query; 0.5 + 0.3*len(q)/len(name) when the name from a later word on starts with it;
    0.3 when only the last query token starts some name token; 0 otherwise.
    """
    q_len = np.strings.str_len(query).astype(np.float64)
    ratio = q_len / np.maximum(np.strings.str_len(name), 1)
    prefix = np.strings.startswith(name, query) & (q_len > 0)
    later = np.zeros(len(query), dtype=bool)
    last = np.array([(tokenize(q) or [""])[-1] for q in query.tolist()], dtype=str)
    token_hit = np.zeros(len(query), dtype=bool)
    lengths = np.strings.str_len(name_tokens) + (name_tokens != "")
    offset = np.cumsum(lengths, axis=1) - lengths
    for j in range(name_tokens.shape[1]):
        present = name_tokens[:, j] != ""
        suffix = np.strings.slice(name, offset[:, j], None)
        if j > 0:
            later |= present & np.strings.startswith(suffix, query) & (q_len > 0)
        token_hit |= present & np.strings.startswith(name_tokens[:, j], last) & (last != "")
    rel = np.where(token_hit, 0.3, 0.0)
    rel = np.where(later, 0.5 + 0.3 * ratio, rel)
    rel = np.where(prefix, 0.6 + 0.3 * ratio, rel)
    return np.where((query == name) & (q_len > 0), 1.0, rel)


# --- Assembly -----------------------------------------------------------------------------


def _assemble(
    cfg: WorldConfig, ent: _Entities, blocks: list[_Block], rng: np.random.Generator
) -> EngagementLog:
    """Concatenate the task blocks, give requests impression ids in time order, shuffle the
    rows of each impression, and write the raw string columns (absent values are "")."""
    entity_ids = np.concatenate([ent.ids, [""]])  # index -1 -> ""
    countries = np.array([*cfg.countries, ""])
    req_parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("time", "task", "user", "country", "query", "source", "local")
    }
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("req", "target", "label")}
    offset = 0
    for block in blocks:
        s, sess = block.sessions, block.request_session
        q = len(sess)
        req_parts["time"].append(block.request_time)
        req_parts["task"].append(np.full(q, TASKS.index(block.task)))
        req_parts["user"].append(np.where(s.user_visible[sess], s.user[sess], -1))
        req_parts["country"].append(np.where(s.country_visible[sess], s.country[sess], -1))
        req_parts["query"].append(block.query.astype(str))
        req_parts["source"].append(block.source.astype(np.int64))
        req_parts["local"].append(np.arange(q))
        rows["req"].append(block.row_request + offset)
        rows["target"].append(block.row_target)
        rows["label"].append(block.row_label)
        offset += q
    req = {k: np.concatenate(v) for k, v in req_parts.items()}
    row = {k: np.concatenate(v) for k, v in rows.items()}
    # impression ids follow time, so a per-user temporal split is also an id split; a
    # request that impressed nothing (possible only in tiny worlds) gets no id
    shown = np.bincount(row["req"], minlength=offset) > 0
    order = np.lexsort((req["local"], req["task"], req["time"]))
    order = order[shown[order]]
    impression_of = np.full(offset, -1, dtype=np.int64)
    impression_of[order] = np.arange(len(order))
    row_impression = impression_of[row["req"]]
    # Slots were built in priority order (the intended search title first, the most
    # similar titles first...); the log must not leak that order, so rows are shuffled.
    row_order = np.lexsort((rng.random(len(row_impression)), row_impression))
    r_req = row["req"][row_order]
    user = req["user"][r_req]
    user_id = np.where(user >= 0, np.strings.add("u", np.maximum(user, 0).astype(str)), "")
    return EngagementLog(
        impression_id=row_impression[row_order],
        timestamp=req["time"][r_req].astype(np.int64),
        task=_compact(np.array(TASKS)[req["task"][r_req]]),
        user_id=_compact(user_id),
        query=_compact(req["query"][r_req]),
        country=_compact(countries[req["country"][r_req]]),
        source_entity_id=_compact(entity_ids[req["source"][r_req]]),
        target_entity_id=_compact(entity_ids[row["target"][row_order]]),
        label=row["label"][row_order].astype(np.int8),
    )


# --- Command line -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Generate a world and print its size, rows per task, time and peak memory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    defaults = WorldConfig()
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--users", type=int, default=defaults.n_users)
    parser.add_argument("--videos", type=int, default=defaults.n_videos)
    parser.add_argument("--games", type=int, default=defaults.n_games)
    parser.add_argument("--collections", type=int, default=defaults.n_collections)
    parser.add_argument("--people", type=int, default=defaults.n_people)
    args = parser.parse_args(argv)
    try:
        config = WorldConfig(
            seed=args.seed,
            n_users=args.users,
            n_videos=args.videos,
            n_games=args.games,
            n_collections=args.collections,
            n_people=args.people,
        )
    except ValueError as exc:
        parser.error(str(exc))
    began = time.perf_counter()
    catalogue, log = generate_world(config)
    seconds = time.perf_counter() - began
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    positives = {t: float(log.label[log.task == t].mean()) for t in TASKS if (log.task == t).any()}
    print(
        f"entities={len(catalogue)} users={config.n_users} rows={len(log)} "
        f"impressions={len(np.unique(log.impression_id))} seconds={seconds:.2f} "
        f"peak_rss_mib={peak_mib:.0f}"
    )
    for task, rows in log.rows_per_task().items():
        print(f"  {task:15s} rows={rows:8d} positive_rate={positives.get(task, 0.0):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
