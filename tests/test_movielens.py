"""MovieLens files -> catalogue + unified engagement log (model_export.movielens).

Real-data tests read ``../shared/datasets/ml-latest-small`` (never copied into the repo)
and are skipped when it is absent; the error-path tests write tiny CSVs to ``tmp_path``.
"""

from __future__ import annotations

import csv
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from app.core.catalogue import Catalogue
from app.core.context import TASKS, impute_context, normalise_query, tokenize
from model_export.engagement_log import EngagementLog
from model_export.movielens import (
    TYPO_KINDS,
    LoadReport,
    MovieLensConfig,
    MovieLensError,
    _fill_negatives,
    load_movielens,
    split_title,
    typo_variants,
)

ML_SMALL = Path(__file__).resolve().parents[2] / "shared/datasets/ml-latest-small"

Loaded = tuple[Catalogue, EngagementLog, LoadReport]


@pytest.fixture(scope="module")
def ml_small() -> Loaded:
    """The real data set, derived once (seconds): tests using it are marked slow
    (``SLOW_FIXTURES`` in tests/conftest.py)."""
    if not (ML_SMALL / "ratings.csv").is_file():
        pytest.skip(f"MovieLens data set not found at {ML_SMALL}")
    return load_movielens(ML_SMALL, seed=7)


def prefix_distance(query: str, name: str) -> int:
    """Fewest edits (Levenshtein) turning ``query`` into a prefix of ``name`` that starts at
    a word of it; both already normalised."""
    best = len(query)
    for start in [0, *(i for i in range(1, len(name)) if name[i - 1] == " ")]:
        part = name[start : start + len(query) + 2]
        previous = list(range(len(part) + 1))
        for i, q in enumerate(query, 1):
            current = [i]
            for j, c in enumerate(part, 1):
                current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (q != c)))
            previous = current
        best = min(best, *previous)
    return best


def search_sessions(log: EngagementLog) -> list[tuple[str, str, list[str]]]:
    """(user, positive, queries) of each search session: consecutive impressions of one
    user and positive, a second apart (two sessions can merge by accident: rare)."""
    pos = log.select((log.task == "search") & (log.label == 1))
    order = np.argsort(pos.impression_id, kind="stable")
    ids, ts = pos.impression_id[order], pos.timestamp[order]
    user, target = pos.user_id[order].tolist(), pos.target_entity_id[order].tolist()
    query = pos.query[order].tolist()
    sessions: list[tuple[str, str, list[str]]] = []
    for k in range(len(ids)):
        if (
            k
            and ids[k] == ids[k - 1] + 1
            and ts[k] == ts[k - 1] + 1
            and (user[k], target[k]) == sessions[-1][:2]
        ):
            sessions[-1][2].append(query[k])
        else:
            sessions.append((user[k], target[k], [query[k]]))
    return sessions


@pytest.fixture(scope="module")
def ratings_by_user() -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with (ML_SMALL / "ratings.csv").open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(f"u{row['userId']}", {})[f"m{row['movieId']}"] = float(row["rating"])
    return out


# ----------------------------------------------------------------- ml-latest-small


def test_every_task_has_rows_and_positives(ml_small: Loaded) -> None:
    _, log, report = ml_small
    assert set(np.unique(log.task).tolist()) == set(TASKS)
    assert log.rows_per_task() == dict(report.rows_per_task)
    assert set(np.unique(log.label).tolist()) == {0, 1}
    for task in TASKS:
        in_task = log.task == task
        assert report.rows_per_task[task] > 0
        assert int(log.label[in_task].sum()) == report.positives_per_task[task] > 0
        assert len(np.unique(log.impression_id[in_task])) == report.impressions_per_task[task]
    assert 1_200_000 <= len(log) <= 2_000_000
    assert report.movies_read == 9742
    assert report.ratings_read == 100836
    assert report.tags_read == 3683
    assert report.ratings_unknown_movie == report.tags_unknown_movie == 0


def test_rows_of_an_impression_share_the_context(ml_small: Loaded) -> None:
    _, log, _ = ml_small
    order = np.argsort(log.impression_id, kind="stable")
    ids = log.impression_id[order]
    same = ids[1:] == ids[:-1]
    for column in ("timestamp", "task", "user_id", "query", "source_entity_id"):
        values = getattr(log, column)[order]
        assert np.all(values[1:][same] == values[:-1][same]), column
    # Every impression but a prequery one of a user who liked nothing holds one positive.
    positives = np.bincount(log.impression_id, weights=log.label)
    sizes = np.bincount(log.impression_id)
    non_empty = sizes > 0
    assert set(positives[non_empty].astype(int).tolist()) <= {0, 1}
    no_positive = np.flatnonzero(non_empty & (positives == 0))
    assert np.all(log.task[np.isin(log.impression_id, no_positive)] == "prequery")


def test_every_id_is_in_the_catalogue(ml_small: Loaded) -> None:
    catalogue, log, _ = ml_small
    targets = np.unique(log.target_entity_id)
    assert np.isin(targets, catalogue.entity_id).all()
    assert np.all(catalogue.entity_type[[catalogue.index[t] for t in targets.tolist()]] == "video")
    mlt = np.unique(log.source_entity_id[log.task == "more_like_this"])
    assert np.all(catalogue.entity_type[[catalogue.index[s] for s in mlt.tolist()]] == "video")
    entity = np.unique(log.source_entity_id[log.task == "entity"])
    assert np.all(catalogue.entity_type[[catalogue.index[s] for s in entity.tolist()]] == "genre")
    no_source = np.isin(log.task, ["search", "prequery"])
    assert np.all(log.source_entity_id[no_source] == "")
    assert np.all(log.query[~(log.task == "search")] == "")
    assert set(np.unique(log.user_id).tolist()) <= {f"u{i}" for i in range(1, 611)}


def test_display_names_put_the_article_in_front(ml_small: Loaded) -> None:
    catalogue, _, _ = ml_small
    matrix = catalogue.index["m2571"]  # "Matrix, The (1999)"
    assert catalogue.display_name[matrix] == "The Matrix"
    assert catalogue.year[matrix] == 1999
    assert catalogue.genres[matrix] == "Action|Sci-Fi|Thriller"
    misérables = catalogue.index["m73"]  # "Misérables, Les (1995)"
    assert catalogue.display_name[misérables] == "Les Misérables"
    no_year = catalogue.index["m40697"]  # "Babylon 5"
    assert (catalogue.display_name[no_year], catalogue.year[no_year]) == ("Babylon 5", 0)
    no_genres = catalogue.genres[catalogue.entity_type == "video"] == ""
    assert no_genres.sum() == 34  # "(no genres listed)"


@pytest.mark.parametrize(
    ("title", "display", "typed", "year"),
    [
        ("Matrix, The (1999)", "The Matrix", "The Matrix", 1999),
        ("Walk in the Clouds, A (1995)", "A Walk in the Clouds", "A Walk in the Clouds", 1995),
        (
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            "The City of Lost Children (La Cité des enfants perdus)",
            "The City of Lost Children",
            1995,
        ),
        ("Bear, The (Ours, L') (1988)", "The Bear (L'Ours)", "The Bear", 1988),
        ("Boot, Das (Boat, The) (1981)", "Das Boot (The Boat)", "Das Boot", 1981),
        (
            "Death Note: Desu nôto (2006–2007)",
            "Death Note: Desu nôto",
            "Death Note: Desu nôto",
            2006,
        ),
        ("(500) Days of Summer (2009)", "(500) Days of Summer", "(500) Days of Summer", 2009),
        ("Paris, Texas (1984)", "Paris, Texas", "Paris, Texas", 1984),
        ("Babylon 5", "Babylon 5", "Babylon 5", 0),
        ("Justice League: Doom (2012) ", "Justice League: Doom", "Justice League: Doom", 2012),
    ],
)
def test_split_title(title: str, display: str, typed: str, year: int) -> None:
    assert split_title(title) == (display, typed, year)


def test_genre_entities_link_to_their_movies(ml_small: Loaded) -> None:
    catalogue, _, _ = ml_small
    sci_fi = catalogue.index["genre:Sci-Fi"]
    assert catalogue.entity_type[sci_fi] == "genre"
    assert catalogue.display_name[sci_fi] == "Sci-Fi"
    assert catalogue.index["m2571"] in catalogue.linked(sci_fi).tolist()
    genres = np.flatnonzero(catalogue.entity_type == "genre")
    assert len(genres) == 19
    for g in genres.tolist():
        members = catalogue.linked(g)
        assert len(members) > 0
        name = str(catalogue.display_name[g])
        assert all(name in catalogue.genres[m].split("|") for m in members.tolist())
    videos = catalogue.genres[catalogue.entity_type == "video"].tolist()
    assert len(catalogue.link_source) == sum(len(g.split("|")) for g in videos if g)


def test_no_country_is_invented(ml_small: Loaded) -> None:
    catalogue, log, _ = ml_small
    assert np.all(log.country == "")
    assert np.all(catalogue.countries == "")
    assert catalogue.country_names == ()


def test_same_seed_gives_identical_arrays(ml_small: Loaded) -> None:
    catalogue, log, report = ml_small
    catalogue2, log2, report2 = load_movielens(ML_SMALL, seed=7)
    assert report2 == report
    for name, column in log.columns().items():
        assert np.array_equal(column, getattr(log2, name)), name
    for name, column in catalogue.columns().items():
        assert np.array_equal(column, catalogue2.columns()[name]), name


def test_every_logged_context_imputes(ml_small: Loaded) -> None:
    catalogue, log, _ = ml_small

    def name(entity_id: str) -> str | None:
        i = catalogue.index.get(entity_id)
        return None if i is None else str(catalogue.display_name[i])

    contexts = set(
        zip(log.task.tolist(), log.query.tolist(), log.source_entity_id.tolist(), strict=True)
    )
    for task, query, source in contexts:
        ctx = impute_context(task, "u1", query, "", source, name)
        assert ctx.query or task == "prequery"


def test_search_sessions_are_successive_prefixes(ml_small: Loaded) -> None:
    _, log, _ = ml_small
    search = log.select(log.task == "search")
    first = np.unique(search.impression_id, return_index=True)[1]
    ids = search.impression_id[first]
    user = search.user_id[first]
    query, ts = search.query[first], search.timestamp[first]
    positive_target = {
        int(i): t
        for i, t in zip(
            search.impression_id[search.label == 1].tolist(),
            search.target_entity_id[search.label == 1].tolist(),
            strict=True,
        )
    }
    target = np.array([positive_target[int(i)] for i in ids.tolist()])
    # Within a session: consecutive impression ids, same user and target, a second apart.
    same_session = (
        (np.diff(ids) == 1)
        & (user[1:] == user[:-1])
        & (target[1:] == target[:-1])
        & (np.diff(ts) == 1)
    )
    continued = 0
    for k in np.flatnonzero(same_session).tolist():
        before, after = str(query[k]), str(query[k + 1])
        if after.startswith(before) and len(after) > len(before):
            continued += 1
    # Accidental neighbours (two tags of one movie a second apart) are rare.
    assert continued >= 0.99 * same_session.sum()
    assert same_session.sum() > 0.75 * len(ids)
    assert max(len(q) for q in query.tolist()) <= 24
    # User 2 tagged movie 60756 "Highly quotable": they typed it keystroke by keystroke.
    typed = query[(user == "u2") & (target == "m60756")].tolist()
    expected = ["Highly quotable"[:n] for n in range(2, len("Highly quotable") + 1)]
    assert all(prefix in typed for prefix in expected)


def test_search_negatives_match_the_typed_token(ml_small: Loaded) -> None:
    catalogue, log, _ = ml_small
    videos = np.flatnonzero(catalogue.entity_type == "video")
    tokens = {
        str(catalogue.entity_id[v]): tokenize(normalise_query(str(catalogue.display_name[v])))
        for v in videos.tolist()
    }
    titles_with_prefix: Counter[str] = Counter()
    for title_tokens in tokens.values():
        titles_with_prefix.update({t[:n] for t in title_tokens for n in range(1, len(t) + 1)})
    search = log.select(log.task == "search")
    positive_of = dict(
        zip(
            search.impression_id[search.label == 1].tolist(),
            search.target_entity_id[search.label == 1].tolist(),
            strict=True,
        )
    )
    negatives = search.select(search.label == 0)
    sample = np.arange(0, len(negatives), 97)
    checked = corrected = 0
    for query, target, impression in zip(
        negatives.query[sample].tolist(),
        negatives.target_entity_id[sample].tolist(),
        negatives.impression_id[sample].tolist(),
        strict=True,
    ):
        norm = normalise_query(query)
        last = tokenize(norm)[-1]
        if titles_with_prefix[last] < 50:  # few matches: random popular top-up
            continue
        checked += 1
        if any(tok.startswith(last) for tok in tokens[target]):
            continue
        # A typo in the last token: the policy matched the token the member meant.
        positive_name = " ".join(tokens[positive_of[impression]])
        assert 1 <= prefix_distance(norm, positive_name) <= 2, (query, target)
        assert any(prefix_distance(last, tok) <= 2 for tok in tokens[target]), (query, target)
        corrected += 1
    assert checked > 100
    assert corrected < 0.05 * checked


def test_title_sessions_are_most_search_impressions(ml_small: Loaded) -> None:
    catalogue, log, report = ml_small
    assert (
        report.title_search_impressions + report.tag_search_impressions
        == report.impressions_per_task["search"]
    )
    share = report.title_search_impressions / report.impressions_per_task["search"]
    assert 0.7 <= share <= 0.8
    assert report.title_sessions > 3 * report.tag_sessions
    # What evaluation sees: the typed text is a prefix of the played title's name, starting
    # at one of its words (typos, and the tags, are the rest).
    positives = log.select((log.task == "search") & (log.label == 1))
    names = {
        str(e): normalise_query(str(n))
        for e, n in zip(catalogue.entity_id.tolist(), catalogue.display_name.tolist(), strict=True)
    }

    def word_prefix(query: str, name: str) -> bool:
        return name.startswith(query) or f" {query}" in f" {name}"

    exact = [
        word_prefix(normalise_query(q), names[t])
        for q, t in zip(positives.query.tolist(), positives.target_entity_id.tolist(), strict=True)
    ]
    assert np.mean(exact) >= 0.65
    # Members stop once they typed enough: most title sessions end before the name does.
    ends = [
        (normalise_query(queries[-1]), names[target]) for _, target, queries in search_sessions(log)
    ]
    title_ends = [(q, n) for q, n in ends if word_prefix(q, n)]
    stopped_early = np.mean([not n.endswith(q) for q, n in title_ends])
    assert stopped_early > 0.6
    assert np.median([len(q) for q, _ in title_ends]) <= 8


def test_tag_sessions_remain(ml_small: Loaded) -> None:
    _, log, report = ml_small
    assert report.tag_sessions == report.tags_read - report.tags_unusable == 3683
    assert report.tag_search_impressions > 30_000
    # "In Netflix queue" (131 tags) is still typed to its end, keystroke by keystroke.
    netflix = [q for _, _, q in search_sessions(log) if q[-1] == "In Netflix queue"]
    assert len(netflix) > 100
    assert all(q == ["In Netflix queue"[:n] for n in range(2, 17)] for q in netflix)


def test_typo_sessions_at_the_configured_share(ml_small: Loaded) -> None:
    catalogue, log, report = ml_small
    assert MovieLensConfig().typo_fraction == 0.1
    assert 0.08 <= report.typo_sessions / report.title_sessions <= 0.12
    assert 0 < report.typo_search_impressions < 0.1 * report.title_search_impressions
    names = {
        str(e): normalise_query(str(n))
        for e, n in zip(catalogue.entity_id.tolist(), catalogue.display_name.tolist(), strict=True)
    }
    # A typo session ends on a query within 2 edits of a prefix of the played title's name
    # (but not on a prefix): find them in the log (short ones are too ambiguous to tell).
    typo_ends: dict[tuple[str, str], int] = {}  # (query, positive) -> edits
    for _, target, queries in search_sessions(log):
        query = normalise_query(queries[-1])
        if len(query) >= 3 and 1 <= (edits := prefix_distance(query, names[target])) <= 2:
            typo_ends[(queries[-1], target)] = edits
    assert 0.8 * report.typo_sessions <= len(typo_ends) <= 1.1 * report.typo_sessions
    # Their negatives do not match the typo better than the played title does: the logging
    # policy matched the token the member meant, not the typo.
    search = log.select(log.task == "search")
    positive = search.label == 1
    key_of = {
        i: (q, t)
        for i, q, t in zip(
            search.impression_id[positive].tolist(),
            search.query[positive].tolist(),
            search.target_entity_id[positive].tolist(),
            strict=True,
        )
        if (q, t) in typo_ends
    }
    closer = total = 0
    for i, target in zip(
        search.impression_id[~positive].tolist(),
        search.target_entity_id[~positive].tolist(),
        strict=True,
    ):
        key = key_of.get(i)
        if key is not None:
            total += 1
            closer += prefix_distance(normalise_query(key[0]), names[target]) < typo_ends[key]
    assert total > 5 * len(typo_ends)
    assert closer < 0.15 * total


def test_typo_variants() -> None:
    variants = typo_variants("The Matrix", 5, 24)
    assert set(variants) == set(TYPO_KINDS)
    assert "Teh M" in variants["transposition"]
    assert "Te M" in variants["missing"]
    assert "Thhe M" in variants["doubled"]
    assert variants["accent"] == []
    for kind in ("transposition", "missing", "doubled"):
        assert variants[kind]
        for variant in variants[kind]:
            distance = prefix_distance(normalise_query(variant), "the matrix")
            assert 1 <= distance <= 2, (kind, variant)
    # A dropped accent is a typo only while normalisation keeps accents.
    accent = typo_variants("Amélie", 4, 24)["accent"]
    assert accent == ([] if normalise_query("Amélie") == "amelie" else ["Amel"])
    assert typo_variants("Nyû", 3, 24)["accent"] == ([] if normalise_query("û") == "u" else ["Nyu"])
    # Every variant of "To" (for "Tootsie") types a prefix of the title: no typo.
    assert all(v == [] for v in typo_variants("Tootsie", 2, 24).values())
    # Within the longest prefix logged.
    doubled = typo_variants("Heat", 4, 4)["doubled"]
    assert doubled == ["Heea", "Heaa"]
    # A variant never types a prefix of another word of the title.
    assert "Str" not in typo_variants("Star Wars: The Empire Strikes Back", 4, 24)["missing"]


def test_recommendation_negatives_were_not_rated(
    ml_small: Loaded, ratings_by_user: dict[str, dict[str, float]]
) -> None:
    catalogue, log, _ = ml_small
    for task in ("prequery", "more_like_this", "entity"):
        rows = log.select(log.task == task)
        for user, target, label in zip(
            rows.user_id.tolist(), rows.target_entity_id.tolist(), rows.label.tolist(), strict=True
        ):
            rating = ratings_by_user[user].get(target)
            if label == 1:
                assert rating is not None and rating >= 4.0
            elif task == "prequery":
                assert rating is None or rating < 4.0  # a low rating is an explicit negative
            else:
                assert rating is None
    entity = log.select(log.task == "entity")
    genre = np.char.replace(entity.source_entity_id, "genre:", "")
    in_genre = [
        g in catalogue.genres[catalogue.index[t]].split("|")
        for g, t in zip(genre.tolist(), entity.target_entity_id.tolist(), strict=True)
    ]
    assert np.mean(in_genre) > 0.99


# --------------------------------------------------------------- hand-written files

MOVIES = """movieId,title,genres
1,"Matrix, The (1999)",Action|Sci-Fi|Thriller
2,Toy Story (1995),Adventure|Animation|Children
3,Heat (1995),Action|Crime|Thriller
4,Alien (1979),Horror|Sci-Fi
5,Some Film,(no genres listed)
"""
RATINGS = """userId,movieId,rating,timestamp
1,1,5.0,100
1,2,2.0,150
1,3,4.0,300
2,2,4.5,100
2,4,3.0,200
"""
TAGS = """userId,movieId,tag,timestamp
1,1,mind bending,120
"""


def write_movielens(
    folder: Path, movies: str = MOVIES, ratings: str = RATINGS, tags: str | None = TAGS
) -> Path:
    (folder / "movies.csv").write_text(movies, encoding="utf-8")
    (folder / "ratings.csv").write_text(ratings, encoding="utf-8")
    if tags is not None:
        (folder / "tags.csv").write_text(tags, encoding="utf-8")
    return folder


def test_small_files_derive_every_task(tmp_path: Path) -> None:
    catalogue, log, report = load_movielens(write_movielens(tmp_path), seed=1)
    assert catalogue.display_name[catalogue.index["m1"]] == "The Matrix"
    assert catalogue.genres[catalogue.index["m5"]] == ""
    assert set(catalogue.entity_id.tolist()) >= {"genre:Sci-Fi", "genre:Action"}
    assert report.rows_per_task["more_like_this"] == len(log.select(log.task == "more_like_this"))
    # User 1 liked m1 (t=100) then m3 (t=300): one more_like_this pair m1 -> m3.
    mlt = log.select((log.task == "more_like_this") & (log.label == 1))
    assert list(zip(mlt.source_entity_id.tolist(), mlt.target_entity_id.tolist(), strict=True)) == [
        ("m1", "m3")
    ]
    # User 1's 2.0 on m2 (t=150) joins the impression of the nearer positive, m1 (t=100).
    low = log.select(
        (log.task == "prequery") & (log.target_entity_id == "m2") & (log.user_id == "u1")
    )
    assert low.label.tolist() == [0]
    with_low = log.select(log.impression_id == low.impression_id[0])
    assert with_low.target_entity_id[with_low.label == 1].tolist() == ["m1"]
    assert np.all(with_low.timestamp == 100)
    # Negatives exclude what the user rated; small data leaves fewer than 7 of them.
    u1 = log.select((log.user_id == "u1") & (log.task == "more_like_this") & (log.label == 0))
    assert set(u1.target_entity_id.tolist()) <= {"m4"}  # m5 has no rating: never shown
    # The tag "mind bending" was typed keystroke by keystroke.
    search = log.select((log.task == "search") & (log.label == 1))
    tag_queries = search.query[search.user_id == "u1"].tolist()
    assert tag_queries[:3] == ["mi", "min", "mind"]
    assert report.low_ratings_without_positive == 0


def test_small_files_typo_sessions_are_successive_prefixes_near_the_title(
    tmp_path: Path,
) -> None:
    config = MovieLensConfig(title_query_fraction=1.0, typo_fraction=1.0, second_word_fraction=0)
    catalogue, log, report = load_movielens(write_movielens(tmp_path), seed=3, config=config)
    # Three positives (u1: m1, m3; u2: m2), each a title session with a typo; one tag.
    assert (report.title_sessions, report.typo_sessions, report.tag_sessions) == (3, 3, 1)
    assert report.tag_search_impressions == len("mind bending") - 1
    sessions = search_sessions(log)
    assert len(sessions) == 4
    for user, target, queries in sessions:
        assert all(b.startswith(a) for a, b in pairwise(queries))
        if target == "m1" and queries[-1].startswith("mi"):
            assert user == "u1" and queries[-1] == "mind bending"
            continue
        name = normalise_query(str(catalogue.display_name[catalogue.index[target]]))
        for query in queries:
            assert prefix_distance(normalise_query(query), name) <= 2, (query, name)
        assert prefix_distance(normalise_query(queries[-1]), name) >= 1, (queries, name)
        assert 2 <= len(queries[-1]) <= config.max_title_prefix


def test_search_knobs_leave_the_other_tasks_unchanged(tmp_path: Path) -> None:
    folder = write_movielens(tmp_path)
    few = MovieLensConfig(title_query_fraction=0, entity_fraction=1)
    many = MovieLensConfig(title_query_fraction=1, typo_fraction=0.5, entity_fraction=1)
    _, log, _ = load_movielens(folder, seed=5, config=few)
    _, more, _ = load_movielens(folder, seed=5, config=many)
    assert len(more.select(more.task == "search")) > len(log.select(log.task == "search"))
    for task in ("prequery", "more_like_this", "entity"):
        a, b = log.select(log.task == task), more.select(more.task == task)
        assert len(a) > 0
        # Impression ids shift by the search block's size; rows keep their order.
        assert np.array_equal(
            np.unique(a.impression_id, return_inverse=True)[1],
            np.unique(b.impression_id, return_inverse=True)[1],
        )
        for name in ("timestamp", "user_id", "query", "source_entity_id", "target_entity_id"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (task, name)
        assert np.array_equal(a.label, b.label)


def test_unknown_movie_ids_are_counted_not_silently_dropped(tmp_path: Path) -> None:
    ratings = RATINGS + "3,999,5.0,400\n3,1,4.0,410\n"
    tags = TAGS + "2,998,spooky,500\n"
    _, log, report = load_movielens(write_movielens(tmp_path, ratings=ratings, tags=tags))
    assert report.ratings_read == 7
    assert report.ratings_unknown_movie == 1
    assert report.tags_read == 2
    assert report.tags_unknown_movie == 1
    assert "m999" not in log.target_entity_id.tolist()
    assert "m998" not in log.target_entity_id.tolist()
    assert "u3" in log.user_id.tolist()  # the user's known rating is kept


def test_missing_file_names_it(tmp_path: Path) -> None:
    write_movielens(tmp_path, tags=None)
    with pytest.raises(MovieLensError, match=r"tags\.csv: file does not exist"):
        load_movielens(tmp_path)


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    ratings = RATINGS.replace("userId,movieId,rating,timestamp", "userId,movieId,score,timestamp")
    write_movielens(tmp_path, ratings=ratings)
    with pytest.raises(
        MovieLensError, match=r"ratings\.csv: missing required column\(s\) \['rating'\]"
    ):
        load_movielens(tmp_path)


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (
            "1,4,six,400",
            r"ratings\.csv: line 7: column 'rating' must be a number in \[0\.5, 5\.0\], got 'six'",
        ),
        ("1,4,5.5,400", r"ratings\.csv: line 7: column 'rating' .* got '5\.5'"),
        ("1,4,0.0,400", r"ratings\.csv: line 7: column 'rating' .* got '0\.0'"),
        ("1,4,nan,400", r"ratings\.csv: line 7: column 'rating' .* got 'nan'"),
        ("x1,4,4.0,400", r"ratings\.csv: line 7: column 'userId' must be an integer, got 'x1'"),
        ("1,4.0,4.0,400", r"ratings\.csv: line 7: column 'movieId' must be an integer"),
        ("1,4,4.0,yesterday", r"ratings\.csv: line 7: column 'timestamp' must be an integer"),
        ("1,4,4.0", r"ratings\.csv: line 7: column 'timestamp' is missing \(expected 4 fields"),
        (
            "1,4,4.0,400,extra",
            r"ratings\.csv: line 7: unexpected extra field after column 'timestamp'",
        ),
    ],
)
def test_malformed_rating_row_names_file_line_and_column(
    tmp_path: Path, bad_row: str, message: str
) -> None:
    write_movielens(tmp_path, ratings=RATINGS + bad_row + "\n")
    with pytest.raises(MovieLensError, match=message):
        load_movielens(tmp_path)


def test_malformed_movie_rows(tmp_path: Path) -> None:
    write_movielens(tmp_path, movies=MOVIES + "1,Duplicate (2000),Drama\n")
    with pytest.raises(MovieLensError, match=r"movies\.csv: line 7: column 'movieId' repeats 1"):
        load_movielens(tmp_path)
    write_movielens(tmp_path, movies=MOVIES + '6,"  ",Drama\n')
    with pytest.raises(MovieLensError, match=r"movies\.csv: line 7: column 'title' has no name"):
        load_movielens(tmp_path)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match=r"negatives must be >= 0, got -1"):
        MovieLensConfig(negatives=-1)
    with pytest.raises(ValueError, match=r"entity_fraction must be in \[0, 1\], got 1.5"):
        MovieLensConfig(entity_fraction=1.5)
    with pytest.raises(ValueError, match=r"typo_fraction must be in \[0, 1\], got -0.1"):
        MovieLensConfig(typo_fraction=-0.1)
    with pytest.raises(ValueError, match=r"title_stop_exponent must be > 0, got 0"):
        MovieLensConfig(title_stop_exponent=0)


def test_negative_sampler_never_repeats_nor_excludes() -> None:
    rng = np.random.default_rng(0)
    weights = np.array([0.0, 1.0, 1.0, 1.0, 100.0, 1.0])
    out = np.full((500, 3), -1, dtype=np.int64)
    groups = np.zeros(500, dtype=np.int64)
    groups[250:] = 1
    n_items = len(weights)
    excluded = np.array([0 * n_items + 2, 1 * n_items + 4], dtype=np.int64)  # sorted keys
    blocked = np.full((500, 1), 5, dtype=np.int64)
    _fill_negatives(rng, weights, out, groups, excluded, blocked)
    assert np.all(out >= 0)
    for row, group in zip(out.tolist(), groups.tolist(), strict=True):
        assert len(set(row)) == 3
        assert 0 not in row and 5 not in row  # zero weight, blocked
        assert (2 if group == 0 else 4) not in row
    # The heavy item is almost always drawn when it is allowed.
    assert np.mean([4 in row for row in out[:250].tolist()]) > 0.95
    # Group 1 has only items 1, 2, 3 left: each row holds all three.
    assert all(sorted(row) == [1, 2, 3] for row in out[250:].tolist())
    # Too few allowed items: the row keeps -1 slots rather than repeating one.
    short = np.full((1, 4), -1, dtype=np.int64)
    _fill_negatives(rng, weights, short, np.zeros(1, dtype=np.int64), excluded, blocked[:1])
    assert sorted(short[0].tolist()) == [-1, 1, 3, 4]
