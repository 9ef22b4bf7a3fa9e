"""The name index (app.core.text_index): token prefix ranges, postings, idf, trigrams,
persistence."""

from __future__ import annotations

from pathlib import Path

import hand_world
import numpy as np
import pytest
from rapidfuzz.distance import OSA

from app.core.catalogue import COLUMNS as CATALOGUE_COLUMNS
from app.core.catalogue import Catalogue
from app.core.context import normalise_query, tokenize
from app.core.table_io import TableError, save_table
from app.core.text_index import (
    MAX_NAME_TRIGRAMS,
    TRIGRAM_BUCKETS,
    TextIndex,
    query_trigrams,
    stable_hash,
    typo_budget,
)


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return hand_world.catalogue()


@pytest.fixture(scope="module")
def index(catalogue: Catalogue) -> TextIndex:
    return TextIndex.build(catalogue)


def ids(catalogue: Catalogue, entities: np.ndarray) -> set[str]:
    return set(catalogue.entity_id[entities].tolist())


def test_names_are_normalised_and_vocab_sorted_unique(index: TextIndex) -> None:
    assert index.names[0] == "stranger things"
    assert list(index.vocab) == sorted(set(index.vocab.tolist()))
    assert "stranger" in index.vocab and "Stranger" not in index.vocab


def test_exact_token_range_is_one_entry_or_empty(index: TextIndex) -> None:
    lo, hi = index.token_range("star", prefix=False)
    assert hi - lo == 1 and index.vocab[lo] == "star"
    lo, hi = index.token_range("sta", prefix=False)
    assert hi == lo


def test_prefix_range_holds_exactly_the_tokens_starting_with_it(index: TextIndex) -> None:
    lo, hi = index.token_range("stra", prefix=True)
    assert sorted(index.vocab[lo:hi].tolist()) == ["strange", "stranger"]
    lo, hi = index.token_range("st", prefix=True)
    expected = sorted(t for t in index.vocab.tolist() if t.startswith("st"))
    assert index.vocab[lo:hi].tolist() == expected
    assert expected == ["star", "strange", "stranger"]


@pytest.mark.parametrize(
    "token", ["zzz", "a", "", "strangerthingsforever", "\U0010ffff", "collection", "collectio"]
)
def test_prefix_range_matches_a_brute_force_scan(index: TextIndex, token: str) -> None:
    lo, hi = index.token_range(token, prefix=True)
    assert index.vocab[lo:hi].tolist() == [t for t in index.vocab.tolist() if t.startswith(token)]


def test_postings_of_a_token_and_of_a_prefix(index: TextIndex, catalogue: Catalogue) -> None:
    assert ids(catalogue, index.postings("star", prefix=False)) == {"v_starriv", "v_star"}
    assert ids(catalogue, index.postings("stra", prefix=True)) == {"v_stranger", "v_strange"}
    assert ids(catalogue, index.postings("crown", prefix=False)) == {
        "v_crown",
        "g_crownq",
    }
    assert len(index.postings("stra", prefix=False)) == 0
    assert len(index.postings("nothing", prefix=True)) == 0


def test_postings_list_an_entity_once_per_token(index: TextIndex) -> None:
    for lo in range(len(index.vocab)):
        posting = index.post_indices[index.post_indptr[lo] : index.post_indptr[lo + 1]]
        assert len(posting) == len(np.unique(posting)) == index.vocab_df[lo]


def test_a_repeated_word_counts_once_in_df() -> None:
    cat = Catalogue.from_columns(
        {
            "entity_id": np.array(["a", "b"]),
            "entity_type": np.array(["video", "video"]),
            "display_name": np.array(["New New York", "New Order"]),
            "year": np.zeros(2, dtype=np.int32),
            "genres": np.array(["", ""]),
            "countries": np.array(["", ""]),
            "link_source": np.array([], dtype=str),
            "link_target": np.array([], dtype=str),
        }
    )
    index = TextIndex.build(cat)
    lo, _ = index.token_range("new", prefix=False)
    assert index.vocab_df[lo] == 2
    assert sorted(index.postings("new", prefix=False).tolist()) == [0, 1]


def test_idf_decreases_with_document_frequency(index: TextIndex) -> None:
    # df: "crown" 2 (The Crown, Crown Quest), "water" 1, unknown 0
    assert index.idf("zzz", prefix=False) > index.idf("water", prefix=False)
    assert index.idf("water", prefix=False) > index.idf("crown", prefix=False)
    assert index.idf("crown", prefix=False) > 0


def test_idf_of_a_prefix_uses_its_most_common_completion(index: TextIndex) -> None:
    # "star" (df 2) is the most common token starting with "st"
    assert index.idf("st", prefix=True) == pytest.approx(index.idf("star", prefix=False))


def test_idf_formula() -> None:
    index = TextIndex.build(hand_world.catalogue())
    n = len(hand_world.ENTITIES)
    assert index.idf("crown", prefix=False) == pytest.approx(np.log(1 + (n - 2 + 0.5) / 2.5))


def test_stable_hash_is_in_range_and_never_zero() -> None:
    values = [stable_hash(f"t{i}", 7) for i in range(200)]
    assert min(values) >= 1 and max(values) <= 6
    assert stable_hash("abc", TRIGRAM_BUCKETS) == stable_hash("abc", TRIGRAM_BUCKETS)


def test_query_trigrams_are_unique_sorted_and_start_anchored() -> None:
    grams = query_trigrams("star")
    assert grams.dtype == np.int64
    assert list(grams) == sorted(set(grams.tolist()))
    expected = {stable_hash(g, TRIGRAM_BUCKETS) for g in ("$st", "sta", "tar")}
    assert set(grams.tolist()) == expected
    assert len(query_trigrams("s")) == 0  # "$s" is shorter than a trigram
    assert len(query_trigrams("")) == 0


def test_name_trigrams_are_padded_with_zero(index: TextIndex) -> None:
    assert index.name_trigrams.shape == (len(index.names), MAX_NAME_TRIGRAMS)
    star = int(np.flatnonzero(index.names == "star")[0])
    row = index.name_trigrams[star]
    # "$star$": $st sta tar ar$
    assert (row > 0).sum() == 4
    assert np.all(row[4:] == 0)


def test_trigram_postings_find_names_sharing_a_trigram(
    index: TextIndex, catalogue: Catalogue
) -> None:
    grams = query_trigrams("dark")
    found = index.trigram_postings(grams)
    # every word is an anchor: "strange days" holds "$da" of "dark"
    assert ids(catalogue, found) == {"v_dark", "v_strange"}
    assert ids(catalogue, index.trigram_postings(query_trigrams("wat"))) == {"v_dark"}
    assert len(index.trigram_postings(np.zeros(0, dtype=np.int64))) == 0


def test_save_load_round_trip(index: TextIndex, tmp_path: Path) -> None:
    path = tmp_path / "text_index.npz"
    index.save(path)
    loaded = TextIndex.load(path)
    for name, column in index.columns().items():
        assert np.array_equal(column, loaded.columns()[name]), name
    assert loaded.avg_tokens == index.avg_tokens
    assert np.array_equal(loaded.padded_names, index.padded_names)
    assert loaded.postings("stra", prefix=True).tolist() == index.postings("stra", True).tolist()
    assert loaded.idf("crown", prefix=False) == index.idf("crown", prefix=False)


def test_load_refuses_a_table_missing_a_column(index: TextIndex, tmp_path: Path) -> None:
    path = tmp_path / "text_index.npz"
    columns = index.columns()
    del columns["vocab_df"]
    save_table(path, columns)
    with pytest.raises(TableError, match=r"missing required column\(s\) \['vocab_df'\]"):
        TextIndex.load(path)


def empty_catalogue() -> Catalogue:
    columns = {name: np.array([], dtype=str) for name in CATALOGUE_COLUMNS}
    return Catalogue.from_columns(columns | {"year": np.array([], dtype=np.int32)})


def test_empty_catalogue_builds_an_empty_index() -> None:
    cat = empty_catalogue()
    index = TextIndex.build(cat)
    assert len(index.vocab) == 0
    assert len(index.postings("a", prefix=True)) == 0
    assert index.idf("a", prefix=False) > 0


# "atq" and "cej" hash to the same trigram bucket: a name holding both must still count
# that bucket once, or trigram containment exceeds 1 and retrieval double-counts the name.
COLLIDING = ("atq", "cej")


def one_title(name: str, entity_id: str) -> Catalogue:
    """A catalogue of one video called ``name``."""
    return Catalogue.from_columns(
        {
            "entity_id": np.array([entity_id]),
            "entity_type": np.array(["video"]),
            "display_name": np.array([name]),
            "year": np.zeros(1, dtype=np.int32),
            "genres": np.array([""]),
            "countries": np.array([""]),
            "link_source": np.array([], dtype=str),
            "link_target": np.array([], dtype=str),
        }
    )


def test_the_colliding_pair_still_collides() -> None:
    a, b = COLLIDING
    assert stable_hash(a, TRIGRAM_BUCKETS) == stable_hash(b, TRIGRAM_BUCKETS)


def test_colliding_trigrams_count_once() -> None:
    grams = query_trigrams(" ".join(COLLIDING))
    assert len(grams) == len(np.unique(grams))
    cat = one_title(" ".join(COLLIDING), "x")
    index = TextIndex.build(cat)
    row = index.name_trigrams[0][index.name_trigrams[0] > 0]
    assert len(row) == len(np.unique(row))
    bucket = stable_hash(COLLIDING[0], TRIGRAM_BUCKETS)
    assert index.trigram_postings(np.array([bucket])).tolist() == [0]


# ------------------------------------------------------- word anchors and typo matching

FILMS: tuple[str, ...] = (
    "Toy Story",
    "Toy Story 2",
    "The Godfather",
    "The Godfather: Part II",
    "Tokyo Godfathers",
    "Amélie (Le fabuleux destin d'Amélie Poulain)",
    "Star Wars",
    "Stand by Me",
    "Heat",
    "Interstellar",
)


def films_catalogue() -> Catalogue:
    n = len(FILMS)
    return Catalogue.from_columns(
        {
            "entity_id": np.array([f"m{i}" for i in range(n)]),
            "entity_type": np.array(["video"] * n),
            "display_name": np.array(FILMS),
            "year": np.zeros(n, dtype=np.int32),
            "genres": np.array([""] * n),
            "countries": np.array([""] * n),
            "link_source": np.array([], dtype=str),
            "link_target": np.array([], dtype=str),
        }
    )


@pytest.fixture(scope="module")
def films() -> TextIndex:
    return TextIndex.build(films_catalogue())


def film_names(index: TextIndex, entities: np.ndarray) -> set[str]:
    return set(index.names[entities].tolist())


def vocab_of(index: TextIndex, ids_: np.ndarray) -> set[str]:
    return set(index.vocab[ids_].tolist())


def hashes(*grams: str) -> set[int]:
    return {stable_hash(g, TRIGRAM_BUCKETS) for g in grams}


def test_name_trigrams_anchor_every_word(films: TextIndex) -> None:
    row = films.name_trigrams[int(np.flatnonzero(films.names == "the godfather")[0])]
    held = set(row[row > 0].tolist())
    # "$the$ $godfather$": each word starts and ends with an anchor ...
    assert hashes("$th", "he$", "$go", "god", "her", "er$") <= held
    # ... and no trigram spans two words
    assert not hashes("e g", "he ", " go") & held
    godfather = ("$go", "god", "odf", "dfa", "fat", "ath", "the", "her", "er$")
    assert held == hashes("$th", "the", "he$", *godfather)  # "the" is in both words


def test_query_trigrams_leave_only_the_last_word_open() -> None:
    assert set(query_trigrams("the godf").tolist()) == hashes(
        "$th", "the", "he$", "$go", "god", "odf"
    )
    # a complete query (a page's imputed name) closes its last word too
    closed = query_trigrams("the godf", prefix=False)
    assert set(closed.tolist()) == hashes("$th", "the", "he$", "$go", "god", "odf", "df$")


def test_a_typo_in_a_later_word_shares_its_anchored_trigrams(films: TextIndex) -> None:
    # the name's trigrams start at "$go" of its second word, as the query's do
    grams = query_trigrams("godfahter")
    godfather = int(np.flatnonzero(films.names == "the godfather")[0])
    shared = np.isin(films.name_trigrams[godfather], grams).sum()
    assert shared / len(grams) >= 0.5
    assert godfather in films.trigram_postings(grams).tolist()


def test_long_names_are_cut_keeping_their_leading_words() -> None:
    # 64 two-letter words, 191 characters (under MAX_QUERY_CHARS), 128 distinct trigrams
    words = [a + b for a in "abcdefgh" for b in "abcdefgh"]
    cat = one_title(" ".join(words), "long")
    row = TextIndex.build(cat).name_trigrams[0]
    assert (row > 0).sum() == MAX_NAME_TRIGRAMS
    assert hashes("$aa", "aa$") <= set(row.tolist())  # the first word's
    assert not hashes("$hh", "hh$") & set(row.tolist())  # the last word's


@pytest.mark.parametrize(
    ("length", "budget"), [(0, 0), (1, 0), (3, 0), (4, 1), (7, 1), (8, 2), (20, 2)]
)
def test_typo_budget(length: int, budget: int) -> None:
    assert typo_budget(length) == budget


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("godfahter", {"godfather", "godfathers"}),  # transposition (2 budget: + "s")
        ("godfaher", {"godfather", "godfathers"}),  # missing letter
        ("godfatther", {"godfather", "godfathers"}),  # doubled letter
        ("godfather", {"godfather", "godfathers"}),  # distance 0 is within the budget
        ("intersteller", {"interstellar"}),  # substitution
        ("wras", {"wars"}),  # transposition in a 4-letter token
        ("stroy", {"story"}),
        ("amelei", {"amelie"}),
    ],
)
def test_fuzzy_tokens_within_the_typo_budget(
    films: TextIndex, token: str, expected: set[str]
) -> None:
    assert vocab_of(films, films.fuzzy_tokens(token, prefix=False)) == expected


@pytest.mark.parametrize(
    "token",
    [
        "wrsa",  # 2 edits from "wars": over the budget of a 4-7 letter token
        "gxdfxthxr",  # 3 edits from "godfather"
        "hte",  # 1 edit from "the", but 3 letters: no typo allowed
        "toi",
        "sta",
        "",
    ],
)
def test_fuzzy_tokens_outside_the_budget_or_too_short(films: TextIndex, token: str) -> None:
    assert len(films.fuzzy_tokens(token, prefix=False)) == 0
    assert len(films.fuzzy_tokens(token, prefix=True)) == 0
    assert len(films.fuzzy_postings(token, prefix=True)) == 0


def test_fuzzy_prefix_matches_the_start_of_a_token(films: TextIndex) -> None:
    # "godfah" is 1 edit from "godfat", the start of "godfather(s)"; as a whole token it
    # is 3 letters short
    assert len(films.fuzzy_tokens("godfah", prefix=False)) == 0
    assert vocab_of(films, films.fuzzy_tokens("godfah", prefix=True)) == {
        "godfather",
        "godfathers",
    }
    assert film_names(films, films.fuzzy_postings("godfah", prefix=True)) == {
        "the godfather",
        "the godfather part ii",
        "tokyo godfathers",
    }
    # one extra letter typed ("interss") or one missing ("intrst") still finds it
    for typed in ("interss", "intrst", "intesr"):
        assert vocab_of(films, films.fuzzy_tokens(typed, prefix=True)) == {"interstellar"}


def test_accents_are_folded_in_names_and_queries(films: TextIndex) -> None:
    assert "amelie" in films.vocab and "amélie" not in films.vocab
    amelie = {"amelie le fabuleux destin d amelie poulain"}
    for typed in ("Amélie", "AMELIE", "ame\u0301lie", "amelie"):
        (token,) = tokenize(normalise_query(typed))
        assert film_names(films, films.postings(token, prefix=False)) == amelie
        assert film_names(films, films.fuzzy_postings(token, prefix=True)) == amelie


def test_fuzzy_postings_list_each_entity_once_sorted(films: TextIndex) -> None:
    for token, prefix in (("godfahter", False), ("godfah", True), ("stor", True)):
        found = films.fuzzy_postings(token, prefix)
        assert found.tolist() == sorted(set(found.tolist()))
        tokens = films.fuzzy_tokens(token, prefix)
        by_tokens = np.concatenate([films.postings(str(films.vocab[t]), False) for t in tokens])
        assert found.tolist() == sorted(set(by_tokens.tolist()))


@pytest.mark.parametrize("prefix", [False, True])
def test_fuzzy_tokens_match_a_brute_force_osa_scan(index: TextIndex, prefix: bool) -> None:
    vocab = index.vocab.tolist()
    typed = [*vocab, "strnger", "stranegr", "quets", "wtaer", "midnigth", "xyzw", "collectoin"]
    typed += [t[:n] for t in vocab for n in range(3, len(t))]  # every partly typed token
    for token in typed:
        k = typo_budget(len(token))

        def distance(v: str, token: str = token, k: int = k) -> int:
            if not prefix:
                return int(OSA.distance(token, v))
            lengths = range(len(token) - k, len(token) + k + 1)
            return min(int(OSA.distance(token, v[:n])) for n in lengths)

        expected = [i for i, v in enumerate(vocab) if k and distance(v) <= k]
        assert index.fuzzy_tokens(token, prefix).tolist() == expected, token


def test_fuzzy_matching_survives_save_and_load(films: TextIndex, tmp_path: Path) -> None:
    path = tmp_path / "text_index.npz"
    films.save(path)
    loaded = TextIndex.load(path)
    for token, prefix in (("godfahter", False), ("godfah", True), ("wras", True)):
        expected = films.fuzzy_tokens(token, prefix).tolist()
        assert loaded.fuzzy_tokens(token, prefix).tolist() == expected != []


def test_an_empty_index_matches_no_typo() -> None:
    cat = empty_catalogue()
    index = TextIndex.build(cat)
    assert len(index.fuzzy_tokens("godfather", prefix=True)) == 0
    assert len(index.fuzzy_postings("godfather", prefix=False)) == 0
