"""A hand-built catalogue and engagement log where every count is known, for the
feature, retrieval and leakage tests (imported by those test modules; not a test itself).

Entities (countries: US, GB, DE; ``""`` = available everywhere):

==========  ==========  ===================  =========  ===========================
id          type        name                 countries  links
==========  ==========  ===================  =========  ===========================
v_stranger  video       Stranger Things
v_strange   video       Strange Days         US
v_starriv   video       Star River           US|GB
v_star      video       Star                 GB
v_crown     video       The Crown
g_crownq    game        Crown Quest
v_dark      video       Dark Water           US|GB
v_gospel    video       Midnight Gospel      DE
g_drama     genre       Drama                            -> v_crown, v_dark
p_winona    person      Winona Ryder                     -> v_stranger, v_strange
c_space     collection  Space Collection                 -> v_starriv, v_star
==========  ==========  ===================  =========  ===========================

Item vectors are 2-d: the "dark" titles point along x, the "bright" ones along y, and the
two centroids are the axes, so a user's cluster follows what they played.
"""

from __future__ import annotations

import numpy as np

from app.core.catalogue import Catalogue
from app.core.feature_tables import FeatureTables
from app.core.features import FeatureBuilder
from app.core.text_index import TextIndex
from model_export.engagement_log import EngagementLog
from model_export.table_builder import build_feature_tables

ENTITIES: tuple[tuple[str, str, str, str], ...] = (
    ("v_stranger", "video", "Stranger Things", ""),
    ("v_strange", "video", "Strange Days", "US"),
    ("v_starriv", "video", "Star River", "US|GB"),
    ("v_star", "video", "Star", "GB"),
    ("v_crown", "video", "The Crown", ""),
    ("g_crownq", "game", "Crown Quest", ""),
    ("v_dark", "video", "Dark Water", "US|GB"),
    ("v_gospel", "video", "Midnight Gospel", "DE"),
    ("g_drama", "genre", "Drama", ""),
    ("p_winona", "person", "Winona Ryder", ""),
    ("c_space", "collection", "Space Collection", ""),
)
LINKS: tuple[tuple[str, str], ...] = (
    ("g_drama", "v_crown"),
    ("g_drama", "v_dark"),
    ("p_winona", "v_stranger"),
    ("p_winona", "v_strange"),
    ("c_space", "v_starriv"),
    ("c_space", "v_star"),
)
DARK = ("v_stranger", "v_strange", "v_dark", "v_gospel")  # item vector (1, 0)

# (timestamp, task, user, query, country, source, target, label); one row = one impression
Row = tuple[int, str, str, str, str, str, str, int]
ROWS: tuple[Row, ...] = (
    # user "dark_fan" plays the dark titles -> cluster 1
    (100, "prequery", "dark_fan", "", "US", "", "v_stranger", 1),
    (110, "prequery", "dark_fan", "", "US", "", "v_strange", 1),
    (120, "prequery", "dark_fan", "", "US", "", "v_dark", 1),
    # user "bright_fan" plays the bright ones -> cluster 2
    (100, "prequery", "bright_fan", "", "US", "", "v_starriv", 1),
    (110, "prequery", "bright_fan", "", "US", "", "v_crown", 1),
    (120, "prequery", "bright_fan", "", "US", "", "g_crownq", 1),
    # search: "stra" and "stranger things" lead to Stranger Things; an impressed negative
    (200, "search", "searcher", "Stra", "US", "", "v_stranger", 1),
    (201, "search", "searcher", "stra", "US", "", "v_strange", 0),
    (202, "search", "searcher", "Stranger Things", "US", "", "v_stranger", 1),
    # more like this: from Stranger Things, Dark Water three times, Strange Days once
    (300, "more_like_this", "mlt_user", "", "US", "v_stranger", "v_dark", 1),
    (301, "more_like_this", "mlt_user", "", "US", "v_stranger", "v_dark", 1),
    (302, "more_like_this", "mlt_user", "", "US", "v_stranger", "v_dark", 1),
    (303, "more_like_this", "mlt_user", "", "US", "v_stranger", "v_strange", 1),
    (304, "more_like_this", "mlt_user", "", "US", "v_stranger", "v_crown", 0),
    # entity page: from Drama, The Crown
    (400, "entity", "page_user", "", "GB", "g_drama", "v_crown", 1),
)


def catalogue() -> Catalogue:
    return Catalogue.from_columns(
        {
            "entity_id": np.array([e[0] for e in ENTITIES]),
            "entity_type": np.array([e[1] for e in ENTITIES]),
            "display_name": np.array([e[2] for e in ENTITIES]),
            "year": np.zeros(len(ENTITIES), dtype=np.int32),
            "genres": np.array([""] * len(ENTITIES)),
            "countries": np.array([e[3] for e in ENTITIES]),
            "link_source": np.array([s for s, _ in LINKS]),
            "link_target": np.array([t for _, t in LINKS]),
        }
    )


def make_log(rows: tuple[Row, ...] | list[Row]) -> EngagementLog:
    """One impression per row, impression ids in row order."""
    cols = list(zip(*rows, strict=True)) if rows else [()] * 8
    return EngagementLog.from_columns(
        {
            "impression_id": np.arange(len(rows)),
            "timestamp": np.array(cols[0], dtype=np.int64),
            "task": np.array(cols[1], dtype=str),
            "user_id": np.array(cols[2], dtype=str),
            "query": np.array(cols[3], dtype=str),
            "country": np.array(cols[4], dtype=str),
            "source_entity_id": np.array(cols[5], dtype=str),
            "target_entity_id": np.array(cols[6], dtype=str),
            "label": np.array(cols[7], dtype=np.int8),
        }
    )


def item_vectors(cat: Catalogue) -> np.ndarray:
    dark = np.isin(cat.entity_id, DARK)
    return np.where(dark[:, None], [1.0, 0.0], [0.0, 1.0]).astype(np.float32)


CENTROIDS = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # cluster 1 dark, 2 bright


def tables(cat: Catalogue, log: EngagementLog) -> FeatureTables:
    return build_feature_tables(log, cat, item_vectors(cat), CENTROIDS)


def builder(rows: tuple[Row, ...] | list[Row] = ROWS) -> FeatureBuilder:
    cat = catalogue()
    return FeatureBuilder(cat, tables(cat, make_log(rows)), TextIndex.build(cat))
