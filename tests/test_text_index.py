"""The name index (app.text_index): token prefix ranges, postings, idf, trigrams,
persistence."""

from __future__ import annotations

from pathlib import Path

import hand_world
import numpy as np
import pytest

from app.catalogue import Catalogue
from app.tables import TableError, save_table
from app.text_index import (
    MAX_NAME_TRIGRAMS,
    TRIGRAM_BUCKETS,
    TextIndex,
    query_trigrams,
    stable_hash,
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


@pytest.mark.parametrize("token", ["zzz", "a", "", "strangerthingsforever", "\U0010ffff"])
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
    assert ids(catalogue, found) == {"v_dark"}
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


def test_empty_catalogue_builds_an_empty_index() -> None:
    empty = {name: np.array([], dtype=str) for name in ("entity_id", "entity_type")}
    cat = Catalogue.from_columns(
        empty
        | {
            "display_name": np.array([], dtype=str),
            "year": np.array([], dtype=np.int32),
            "genres": np.array([], dtype=str),
            "countries": np.array([], dtype=str),
            "link_source": np.array([], dtype=str),
            "link_target": np.array([], dtype=str),
        }
    )
    index = TextIndex.build(cat)
    assert len(index.vocab) == 0
    assert len(index.postings("a", prefix=True)) == 0
    assert index.idf("a", prefix=False) > 0


# "atq" and "cej" hash to the same trigram bucket: a name holding both must still count
# that bucket once, or trigram containment exceeds 1 and retrieval double-counts the name.
COLLIDING = ("atq", "cej")


def test_the_colliding_pair_still_collides() -> None:
    a, b = COLLIDING
    assert stable_hash(a, TRIGRAM_BUCKETS) == stable_hash(b, TRIGRAM_BUCKETS)


def test_colliding_trigrams_count_once() -> None:
    grams = query_trigrams(" ".join(COLLIDING))
    assert len(grams) == len(np.unique(grams))
    cat = Catalogue.from_columns(
        {
            "entity_id": np.array(["x"]),
            "entity_type": np.array(["video"]),
            "display_name": np.array([" ".join(COLLIDING)]),
            "year": np.zeros(1, dtype=np.int32),
            "genres": np.array([""]),
            "countries": np.array([""]),
            "link_source": np.array([], dtype=str),
            "link_target": np.array([], dtype=str),
        }
    )
    index = TextIndex.build(cat)
    row = index.name_trigrams[0][index.name_trigrams[0] > 0]
    assert len(row) == len(np.unique(row))
    bucket = stable_hash(COLLIDING[0], TRIGRAM_BUCKETS)
    assert index.trigram_postings(np.array([bucket])).tolist() == [0]
