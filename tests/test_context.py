"""The unified context and the paper's imputation rules (app.core.context)."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.context import (
    MAX_QUERY_CHARS,
    NULL_SOURCE,
    UNKNOWN_COUNTRY,
    UNKNOWN_USER,
    Context,
    Task,
    clean_countries,
    clean_country,
    clean_user_id,
    clean_user_ids,
    impute_context,
    logged_in,
    normalise_query,
    tokenize,
)

NAMES = {"v1": "Stranger Things: Season 2", "g1": "Sci-Fi & Fantasy", "blank": "!!!"}


def source_name(entity_id: str) -> str | None:
    return NAMES.get(entity_id)


def impute(
    task: str,
    user_id: str | None = "u1",
    query: str | None = None,
    country: str | None = "us",
    source_entity_id: str | None = None,
) -> Context:
    return impute_context(task, user_id, query, country, source_entity_id, source_name)


# ------------------------------------------------------------------------------ search


def test_search_has_the_null_source_and_a_normalised_query() -> None:
    ctx = impute("search", query="  Stranger  THINGS! ")
    assert ctx.task is Task.SEARCH
    assert ctx.source_entity_id == NULL_SOURCE
    assert ctx.query == "stranger things"
    assert ctx.query_imputed is False


def test_search_ignores_a_given_source() -> None:
    ctx = impute("search", query="stra", source_entity_id="v1")
    assert ctx.source_entity_id == NULL_SOURCE
    assert ctx.query == "stra"


@pytest.mark.parametrize("query", [None, "", "   ", "?!.,", "___"])
def test_search_without_a_query_is_refused_naming_the_field(query: str | None) -> None:
    with pytest.raises(ValueError, match=r"^query is required for task search"):
        impute("search", query=query)


# ---------------------------------------------------------------------------- prequery


def test_prequery_has_neither_query_nor_source_even_if_given() -> None:
    ctx = impute("prequery", query="star", source_entity_id="v1")
    assert ctx.query == ""
    assert ctx.source_entity_id == NULL_SOURCE
    assert ctx.query_imputed is False


def test_prequery_with_nothing_at_all() -> None:
    ctx = impute("prequery", user_id=None, country=None)
    assert (ctx.user_id, ctx.country, ctx.query, ctx.source_entity_id) == (
        UNKNOWN_USER,
        UNKNOWN_COUNTRY,
        "",
        NULL_SOURCE,
    )


# ----------------------------------------------------------- more_like_this and entity


@pytest.mark.parametrize(
    ("task", "source", "imputed"),
    [
        ("more_like_this", "v1", "stranger things season 2"),
        ("entity", "g1", "sci fi fantasy"),
    ],
)
def test_page_query_is_imputed_from_the_source_name(task: str, source: str, imputed: str) -> None:
    ctx = impute(task, source_entity_id=source)
    assert ctx.query == imputed
    assert ctx.query_imputed is True
    assert ctx.source_entity_id == source


@pytest.mark.parametrize("task", ["more_like_this", "entity"])
def test_page_keeps_an_explicit_query(task: str) -> None:
    ctx = impute(task, query="Dark  Shows", source_entity_id=" v1 ")
    assert ctx.query == "dark shows"
    assert ctx.query_imputed is False
    assert ctx.source_entity_id == "v1"


@pytest.mark.parametrize("task", ["more_like_this", "entity"])
@pytest.mark.parametrize("source", [None, "", "   "])
def test_page_without_a_source_is_refused_naming_the_field(task: str, source: str | None) -> None:
    with pytest.raises(ValueError, match=rf"^source_entity_id is required for task {task}$"):
        impute(task, source_entity_id=source)


@pytest.mark.parametrize("task", ["more_like_this", "entity"])
def test_page_with_an_unknown_source_is_a_lookup_error(task: str) -> None:
    with pytest.raises(LookupError, match=r"source_entity_id 'nope' is not in the catalogue"):
        impute(task, source_entity_id="nope")


def test_page_whose_source_name_normalises_to_nothing_has_an_empty_imputed_query() -> None:
    ctx = impute("entity", source_entity_id="blank")
    assert ctx.query == ""
    assert ctx.query_imputed is True


# ----------------------------------------------------------------- task, user, country


def test_unknown_task_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"^task must be one of \['search', 'prequery'.*'bogus'"):
        impute("bogus", query="x")


def test_task_is_case_sensitive() -> None:
    with pytest.raises(ValueError, match=r"^task must be one of"):
        impute("SEARCH", query="x")


@pytest.mark.parametrize("user", [None, "", "  \t"])
def test_missing_user_becomes_the_unknown_token(user: str | None) -> None:
    assert impute("prequery", user_id=user).user_id == UNKNOWN_USER


@pytest.mark.parametrize("country", [None, "", "   "])
def test_missing_country_becomes_the_unknown_token(country: str | None) -> None:
    assert impute("prequery", country=country).country == UNKNOWN_COUNTRY


def test_user_and_country_are_trimmed_and_country_upper_cased() -> None:
    ctx = impute("prequery", user_id="  u42 ", country=" gb ")
    assert ctx.user_id == "u42"
    assert ctx.country == "GB"


def test_as_dict_is_plain_json_values() -> None:
    ctx = impute("more_like_this", source_entity_id="v1")
    assert ctx.as_dict() == {
        "task": "more_like_this",
        "user_id": "u1",
        "query": "stranger things season 2",
        "country": "US",
        "source_entity_id": "v1",
        "query_imputed": True,
    }


# Raw ids as logs and requests hold them: padding of every kind of whitespace, case,
# blanks, the unknown tokens themselves, and repeats (the column forms clean each
# distinct value once).
UNTIDY = [
    "",
    " ",
    "\t\n",
    "\u00a0\u3000",  # no-break and ideographic spaces: whitespace to str.strip
    "us",
    " gb ",
    "Us\t",
    "\u2003de\u00a0",
    "US",
    "us",
    "u42",
    "  u42 ",
    "U42",
    "straße",  # upper() spells it with two letters
    "<unknown_country>",
    "<unknown_user>",
    " <UNKNOWN_COUNTRY>\n",
]


def test_column_cleaning_agrees_with_the_context_rule_on_untidy_values() -> None:
    column = np.array(UNTIDY)
    assert clean_countries(column).tolist() == [clean_country(v) for v in UNTIDY]
    assert clean_user_ids(column).tolist() == [clean_user_id(v) for v in UNTIDY]
    assert logged_in(column).tolist() == [clean_user_id(v) != UNKNOWN_USER for v in UNTIDY]
    for raw in UNTIDY:
        ctx = impute("prequery", user_id=raw, country=raw)
        assert (ctx.user_id, ctx.country) == (clean_user_id(raw), clean_country(raw)), raw
    assert clean_countries(column[:0]).tolist() == clean_user_ids(column[:0]).tolist() == []
    assert clean_countries(column.reshape(1, -1)).shape == (1, len(UNTIDY))


@pytest.mark.parametrize(
    ("raw", "country", "user"),
    [
        (None, UNKNOWN_COUNTRY, UNKNOWN_USER),
        ("", UNKNOWN_COUNTRY, UNKNOWN_USER),
        (" \t\u00a0", UNKNOWN_COUNTRY, UNKNOWN_USER),
        (" gb ", "GB", "gb"),
        ("Us\t", "US", "Us"),  # user ids keep their case: they are ids, not codes
        ("straße", "STRASSE", "straße"),
        ("<unknown_country>", UNKNOWN_COUNTRY, "<unknown_country>"),
        ("<unknown_user>", "<UNKNOWN_USER>", UNKNOWN_USER),
    ],
)
def test_cleaning_rules(raw: str | None, country: str, user: str) -> None:
    assert clean_country(raw) == country
    assert clean_user_id(raw) == user


@pytest.mark.parametrize("raw", [None, *UNTIDY])
def test_cleaning_a_cleaned_value_gives_it_back(raw: str | None) -> None:
    # the features clean the country of an imputed context again before the lookup
    assert clean_country(clean_country(raw)) == clean_country(raw)
    assert clean_user_id(clean_user_id(raw)) == clean_user_id(raw)


# ------------------------------------------------------------------- normalise_query


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ""),
        ("", ""),
        ("   \t\n ", ""),
        ("?!.,;:-'\"()[]", ""),
        ("Stranger Things", "stranger things"),
        ("  the   crown ", "the crown"),
        ("Sci-Fi & Fantasy", "sci fi fantasy"),
        ("don't", "don t"),
        ("ＳＴＲＡＮＧＥＲ", "stranger"),  # full-width letters (NFKC)
        ("ﬁnding nemo", "finding nemo"),  # the 'fi' ligature (NFKC)
        ("Straße", "strasse"),  # case folding, not just lower()
        ("CAFÉ", "cafe"),  # accents folded
        ("cafe\u0301", "cafe"),  # a combining accent is dropped, not composed
        ("Amélie", "amelie"),
        ("Crème Brûlée", "creme brulee"),
        ("İstanbul", "istanbul"),  # casefold gives "i" + combining dot: dropped
        ("Ⅻ monkeys", "xii monkeys"),  # roman numeral compatibility character
        ("star ⭐ wars 🚀", "star wars"),  # emoji are not word characters
        ("snake_case_title", "snake case title"),
        ("__init__", "init"),
        ("2001: a space odyssey", "2001 a space odyssey"),
        ("東京 物語", "東京 物語"),
        ("ΣΊΣΥΦΟΣ", "σισυφοσ"),  # Greek tonos folded too
        ("が", "が"),  # Japanese dakuten spells another kana: kept
        ("tab\tand\nnewline", "tab and newline"),
    ],
)
def test_normalise_query(raw: str | None, expected: str) -> None:
    assert normalise_query(raw) == expected


def test_normalise_query_folds_case_before_folding_accents() -> None:
    # "ß" folds to "ss": the accent that followed it goes with the new "s", as it does
    # when the member typed "SS" or "ss" with the accent.
    assert normalise_query("ß\u0301") == normalise_query("SS\u0301") == "ss"
    assert normalise_query("ss\u0301") == normalise_query("sś") == "ss"


@pytest.mark.parametrize(
    "raw", ["Amélie", "amelie", "AMÉLIE", "ame\u0301lie", "Amèlie", "ＡＭÉＬＩＥ", "Ämelie"]
)
def test_normalise_query_folds_accents_whatever_their_form(raw: str) -> None:
    assert normalise_query(raw) == "amelie"


def test_accent_folding_keeps_marks_that_spell_letters() -> None:
    # the katakana "ガ" decomposes to "カ" + dakuten; dropping it would make another word
    assert normalise_query("ガンダム") == "ガンダム" != normalise_query("カンタム")


def test_normalise_query_caps_long_input() -> None:
    out = normalise_query("abc " * 1000)
    assert len(out) <= MAX_QUERY_CHARS
    assert out == out.strip()
    assert out.startswith("abc abc")


def test_normalise_query_cut_never_leaves_a_trailing_space() -> None:
    # 199 characters, then a space at position 199 and more text: the cut must not end
    # in the space.
    text = "a" * (MAX_QUERY_CHARS - 1) + " bbb"
    out = normalise_query(text)
    assert out == "a" * (MAX_QUERY_CHARS - 1)


def test_normalise_query_is_idempotent_on_the_examples() -> None:
    for raw in ("ＳＴＲＡＮＧＥＲ", "Straße", "ﬁ", "cafe\u0301", "x" * 500, "İstanbul", "ガ", "ᾅ"):
        once = normalise_query(raw)
        assert normalise_query(once) == once


def test_tokenize_splits_a_normalised_query() -> None:
    assert tokenize(normalise_query("The  Crown: S2")) == ["the", "crown", "s2"]
    assert tokenize("") == []
