"""Training from the service's own event logs (model_export/event_source.py): impressions
and engagements written by hand as Parquet files, joined into the unified log; every
counted case, the placeholder mapping, the position rule, and the ``events`` source of
``unicorn data`` / ``unicorn build-bundle``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.catalogue import Catalogue
from app.core.context import NULL_SOURCE, TASKS, UNKNOWN_COUNTRY, UNKNOWN_USER, normalise_query
from app.core.table_io import load_table
from model_export.cli import main
from model_export.engagement_log import EngagementLog

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from model_export.event_source import (  # noqa: E402  (after the pyarrow check)
    EventJoinReport,
    catalogue_from,
    load_events,
    stable_impression_ids,
)

T = 1_700_000_000.0
DAY = 86_400.0

IMPRESSION_SCHEMA = pa.schema(
    [
        ("request_id", pa.string()),
        ("ts", pa.float64()),
        ("task", pa.string()),
        ("user", pa.string()),
        ("user_hashed", pa.bool_()),
        ("query", pa.string()),
        ("country", pa.string()),
        ("source_entity_id", pa.string()),
        ("personalization", pa.string()),
        ("model_version", pa.string()),
        ("cache", pa.string()),
        ("entity_ids", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())),
    ]
)
ENGAGEMENT_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("request_id", pa.string()),
        ("entity_id", pa.string()),
        ("type", pa.string()),
        ("ts", pa.float64()),
        ("received_ts", pa.float64()),
    ]
)


def impression(
    request_id: str,
    ts: float,
    task: str,
    shown: list[str],
    user: str = UNKNOWN_USER,
    query: str = "",
    country: str = UNKNOWN_COUNTRY,
    source: str = NULL_SOURCE,
    hashed: bool = False,
) -> dict[str, Any]:
    """One impression as the service logs it: the context AFTER imputation."""
    return {
        "request_id": request_id,
        "ts": ts,
        "task": task,
        "user": user,
        "user_hashed": hashed,
        "query": query,
        "country": country,
        "source_entity_id": source,
        "personalization": "cluster",
        "variant": "default",
        "model_version": "demo-0123456789ab",
        "cache": "miss",
        "entity_ids": shown,
        "scores": [1.0 / (i + 1) for i in range(len(shown))],
    }


def engagement(
    event_id: str, request_id: str, entity: str, kind: str, ts: float, received: float | None = None
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "request_id": request_id,
        "entity_id": entity,
        "type": kind,
        "ts": ts,
        "received_ts": ts + 1.0 if received is None else received,
    }


def write(path: Path, rows: list[dict[str, Any]], schema: Any) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def hand_catalogue() -> Catalogue:
    ids = ["v1", "v2", "v3", "v4", "v5", "v6", "genre:drama"]
    return Catalogue.from_columns(
        {
            "entity_id": np.array(ids),
            "entity_type": np.array(["video"] * 6 + ["genre"]),
            "display_name": np.array(
                ["Star River", "Night", "Blue Sky", "Red Moon", "Old Town", "Long Road", "Drama"]
            ),
            "year": np.array([2020] * 6 + [0]),
            "genres": np.array(["drama"] * 6 + [""]),
            "countries": np.array([""] * 7),
            "link_source": np.array(["genre:drama"] * 2),
            "link_target": np.array(["v5", "v6"]),
        }
    )


STAR_RIVER = normalise_query("Star River")  # the imputed query of a page on v1


def write_events(directory: Path) -> Path:
    """The scenario every test reads (the expected counts are in ``test_every_count``)."""
    directory.mkdir(parents=True, exist_ok=True)
    write(
        directory / "impressions-0001.parquet",
        [
            impression("r1", T, "search", ["v1", "v2", "v3", "v4", "v5"], "u1", "star", "US",
                       hashed=True),
            impression("r2", T + 10, "prequery", ["v1", "v2", "v3", "v4"]),
        ],
        IMPRESSION_SCHEMA,
    )  # fmt: skip
    write(
        directory / "impressions-0002.parquet",
        [
            impression("r3", T + 20.7, "more_like_this", ["v2", "v99", "v3", "v4"], "u2",
                       STAR_RIVER, "GB", "v1"),
            impression("r1", T, "search", ["v1", "v2", "v3", "v4", "v5"], "u1", "star", "US",
                       hashed=True),  # a retried write
            impression("r4", T + 30, "entity", ["v5", "v6"], "u3", "drama", source="genre:drama"),
            impression("r5", T + 35, "bogus", ["v1"]),  # an unknown task
            impression("r6", T + 40, "more_like_this", ["v2", "v3", "v2"], "u1", "night",
                       source="v1"),  # typed on the page; v2 shown twice
            impression("r8", T + 45, "more_like_this", ["v1"], source="v77"),  # unknown page
        ],
        IMPRESSION_SCHEMA,
    )  # fmt: skip
    # A write in progress: never read (its engagement below is an orphan).
    write(directory / "impressions-0003.parquet.tmp", [impression("r7", T, "prequery", ["v1"])],
          IMPRESSION_SCHEMA)  # fmt: skip
    write(
        directory / "engagements-0001.parquet",
        [
            engagement("e1", "r1", "v3", "play", T + 5),
            engagement("e2", "r1", "v2", "hover", T + 6),  # not a positive type
            engagement("e3", "r7", "v1", "click", T + 7),  # orphan (only in the .tmp)
            engagement("e4", "r1", "v6", "click", T + 8),  # v6 was not shown in r1
            engagement("e5", "r3", "v99", "click", T + 22),  # shown, not in the catalogue
        ],
        ENGAGEMENT_SCHEMA,
    )
    write(
        directory / "engagement-20231114T221320-7-000002.parquet",  # FileSink's naming
        [
            engagement("e1", "r1", "v3", "play", T + 5, T + 9),  # the client retried
            engagement("e6", "r3", "v4", "play", T + 20 + 2 * DAY),  # late by both clocks
            engagement("e7", "r4", "v6", "add_to_list", T - 100, T + 31),  # client clock behind
            engagement("e8", "r4", "v5", "click", T + 30 + 2 * DAY, T + 90),  # clock ahead
            engagement("e9", "r6", "v2", "play", T + 140, T + 40 + 3 * DAY),  # sent late
        ],
        ENGAGEMENT_SCHEMA,
    )
    write(directory / "engagements-0003.parquet.tmp", [engagement("e10", "r2", "v1", "play", T)],
          ENGAGEMENT_SCHEMA)  # fmt: skip
    return directory


@pytest.fixture
def events(tmp_path: Path) -> Path:
    return write_events(tmp_path / "events")


def rows_of(log: EngagementLog, report: EventJoinReport) -> dict[str, list[tuple[str, int, int]]]:
    """{impression's request (by its stable id): [(target, position, label), ...]}."""
    names = {int(stable_impression_ids([r])[0]): r for r in ("r1", "r2", "r3", "r4", "r6", "r8")}
    out: dict[str, list[tuple[str, int, int]]] = {}
    for i in range(len(log)):
        request = names[int(log.impression_id[i])]
        out.setdefault(request, []).append(
            (str(log.target_entity_id[i]), int(report.position[i]), int(log.label[i]))
        )
    return out


def test_labels_and_positions(events: Path) -> None:
    log, report = load_events(events, catalogue=hand_catalogue())
    assert len(report.position) == len(log)
    assert rows_of(log, report) == {
        # play on v3 (position 2): positions 0..3 kept, v5 (4) never examined
        "r1": [("v1", 0, 0), ("v2", 1, 0), ("v3", 2, 1), ("v4", 3, 0)],
        # nothing engaged: the top two
        "r2": [("v1", 0, 0), ("v2", 1, 0)],
        # click on v99 (1, not in the catalogue): 0..2 examined, v99 dropped; v4's play late
        "r3": [("v2", 0, 0), ("v3", 2, 0)],
        # skewed client clock (kept), client clock ahead but received in time (kept)
        "r4": [("v5", 0, 1), ("v6", 1, 1)],
        # received 3 days later but played in time (kept); v2's second place ignored
        "r6": [("v2", 0, 1), ("v3", 1, 0)],
    }
    assert report.positives_by_position == (2, 1, 1, *([0] * 8))


def test_every_count(events: Path) -> None:
    _, report = load_events(events, catalogue=hand_catalogue())
    assert report.as_dict() == {
        "impression_files": 2,
        "engagement_files": 2,
        "impressions_read": 8,
        "impressions_duplicate": 1,
        "impressions_invalid": 1,
        "impressions_unknown_source": 1,
        "impressions_used": 5,
        "impressions_hashed_user": 1,
        "impressions_engaged": 4,
        "engagements_read": 10,
        "engagements_duplicate": 1,
        "engagements_unknown_type": 1,
        "engagements_orphan": 1,
        "engagements_unshown": 1,
        "engagements_late": 1,
        "engagements_used": 5,
        "engagements_skewed": 1,
        "shown_rows": 5 + 4 + 4 + 2 + 2,
        "shown_repeated": 1,
        "rows_dropped_by_position": 1 + 2 + 1,
        "rows_unknown_entity": 1,
        "positives_unknown_entity": 1,
        "rows": 12,
        "positives": 4,
        "unknown_types": {"hover": 1},
        "positives_by_position": [2, 1, 1, *([0] * 8)],
    }
    text = str(report)
    assert "engagements_orphan" in text and '{"hover": 1}' in text
    assert "position" not in text.replace("by_position", "")  # the array is not printed


def test_placeholders_map_back_to_raw_values(events: Path) -> None:
    log, _ = load_events(events, catalogue=hand_catalogue())
    ctx = {
        str(t): (str(u), str(q), str(c), str(s))
        for t, u, q, c, s in zip(
            log.task, log.user_id, log.query, log.country, log.source_entity_id, strict=True
        )
        if t != "more_like_this"
    }
    assert ctx == {
        "search": ("u1", "star", "US", ""),
        "prequery": ("", "", "", ""),
        "entity": ("u3", "", "", "genre:drama"),  # the imputed query of the page: ""
    }
    pages = {(str(q), str(s)) for q, s in zip(log.query[log.task == "more_like_this"],
                                              log.source_entity_id[log.task == "more_like_this"],
                                              strict=True)}  # fmt: skip
    assert pages == {("", "v1"), ("night", "v1")}  # the imputed query "", the typed one kept
    for placeholder in (UNKNOWN_USER, UNKNOWN_COUNTRY, NULL_SOURCE):
        for column in (log.user_id, log.country, log.source_entity_id):
            assert placeholder not in column


def test_impression_ids_and_timestamps(events: Path) -> None:
    log, _ = load_events(events, catalogue=hand_catalogue())
    r3 = log.impression_id == stable_impression_ids(["r3"])[0]
    assert np.all(log.timestamp[r3] == int(T + 20.7))
    assert np.all(log.task[r3] == "more_like_this")
    # Stable: another file arriving later changes no id
    write(events / "impressions-0009.parquet", [impression("r9", T + 99, "prequery", ["v1"])],
          IMPRESSION_SCHEMA)  # fmt: skip
    again, _ = load_events(events, catalogue=hand_catalogue())
    assert set(log.impression_id.tolist()) < set(again.impression_id.tolist())
    # Rows are in impression time order
    assert np.all(np.diff(log.timestamp) >= 0)


def test_without_a_catalogue_nothing_is_dropped_for_it(events: Path) -> None:
    log, report = load_events(events)
    assert report.rows_unknown_entity == report.impressions_unknown_source == 0
    assert "v99" in log.target_entity_id and "v77" in log.source_entity_id
    # every page query is then taken as imputed
    assert set(log.query[log.task == "more_like_this"].tolist()) == {""}


def test_the_position_rule_can_be_widened_or_narrowed(events: Path) -> None:
    catalogue = hand_catalogue()
    log, report = load_events(events, catalogue=catalogue, examined_margin=None,
                              unengaged_depth=None)  # fmt: skip
    assert report.rows_dropped_by_position == 0
    assert report.rows == report.shown_rows - report.rows_unknown_entity
    log, report = load_events(events, catalogue=catalogue, examined_margin=0, unengaged_depth=0)
    assert "prequery" not in log.task  # r2 had no engagement
    assert report.rows_dropped_by_position == 2 + 4 + 2 + 1  # r1, r2, r3, r6
    assert np.all(report.position[log.task == "search"] <= 2)
    with pytest.raises(ValueError, match="examined_margin must be >= 0"):
        load_events(events, examined_margin=-1)


def test_positive_types_and_the_delay_are_parameters(events: Path) -> None:
    catalogue = hand_catalogue()
    log, report = load_events(events, catalogue=catalogue,
                              positive_types=("play", "click", "add_to_list", "hover"))  # fmt: skip
    assert report.engagements_unknown_type == 0 and report.unknown_types == {}
    r1 = rows_of(log, report)["r1"]
    assert ("v2", 1, 1) in r1 and ("v3", 2, 1) in r1
    _, report = load_events(events, catalogue=catalogue, max_delay_s=10 * DAY)
    assert report.engagements_late == 0 and report.engagements_used == 6
    _, report = load_events(events, catalogue=catalogue, positive_types=("play",))
    assert report.unknown_types == {"add_to_list": 1, "click": 4, "hover": 1}


def test_unreadable_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_events(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / "impressions-1.parquet.tmp", [], IMPRESSION_SCHEMA)
    with pytest.raises(FileNotFoundError, match=r"no impressions-\*\.parquet files"):
        load_events(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"request_id": ["r1"]}), bad / "impressions-1.parquet")
    with pytest.raises(ValueError, match=r"impressions-1\.parquet: missing column\(s\) \['ts'"):
        load_events(bad)
    (bad / "impressions-1.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"impressions-1\.parquet: cannot read"):
        load_events(bad)


def test_no_engagement_file_gives_impressions_only(tmp_path: Path) -> None:
    directory = tmp_path / "events"
    directory.mkdir()
    shown = ["v1", "v2", "v3"]
    write(directory / "impressions-1.parquet", [impression("r1", T, "prequery", shown)],
          IMPRESSION_SCHEMA)  # fmt: skip
    log, report = load_events(directory)
    assert report.engagement_files == report.engagements_read == 0
    assert log.label.tolist() == [0, 0] and report.position.tolist() == [0, 1]


def test_cli_data_from_events(
    events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "bundle"  # --catalogue-from names a bundle: its catalogue.npz
    hand_catalogue().save(bundle / "catalogue.npz")
    out = tmp_path / "data"
    argv = ["data", "--source", "events", "--path", str(events), "--catalogue-from", str(bundle)]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "event join:" in printed and "engagements_late" in printed
    log = EngagementLog.load(out / "engagements.npz")
    expected, report = load_events(events, catalogue=hand_catalogue())
    for name, column in expected.columns().items():
        assert np.array_equal(getattr(log, name), column), name
    assert Catalogue.load(out / "catalogue.npz").entity_id.tolist() == [
        "v1", "v2", "v3", "v4", "v5", "v6", "genre:drama"
    ]  # fmt: skip
    assert np.array_equal(load_table(out / "positions.npz")["position"], report.position)
    assert json.loads((out / "events_report.json").read_text()) == report.as_dict()
    assert set(TASKS) <= set(log.task.tolist())


def test_cli_events_needs_a_path_and_a_catalogue(
    events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    assert main(["data", "--source", "events", "--path", str(events), "--out", out]) == 2
    assert "--catalogue-from is required for source events" in capsys.readouterr().err
    assert main(["data", "--source", "events", "--catalogue-from", out, "--out", out]) == 2
    assert "--path is required for source events" in capsys.readouterr().err
    argv = ["data", "--source", "events", "--path", str(events), "--catalogue-from", out]
    assert main([*argv, "--out", out]) == 2
    assert f"--catalogue-from {out}: no such bundle or catalogue file" in capsys.readouterr().err
    (tmp_path / "not-a-bundle").mkdir()
    argv[-1] = str(tmp_path / "not-a-bundle")
    assert main([*argv, "--out", out]) == 2
    assert "not-a-bundle/catalogue.npz: table file does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def world_events(directory: Path) -> None:
    """The fast bundle's synthetic world logged as the service would have: each impression
    shown in a shuffled order, an engagement (play) per positive."""
    from handmade_bundle import WORLD

    from model_export.dataset import impression_groups
    from model_export.synthetic import generate_world

    catalogue, log = generate_world(WORLD)
    rng = np.random.default_rng(0)
    imps, engs = [], []
    for rows in impression_groups(log):
        r = rows[0]
        task, request = str(log.task[r]), f"req-{int(log.impression_id[r])}"
        source = str(log.source_entity_id[r]) or NULL_SOURCE
        query = str(log.query[r])
        if task in ("more_like_this", "entity") and not query:
            query = normalise_query(catalogue.name_of(source))
        shown = rng.permutation(rows)
        ts = float(log.timestamp[r]) + 0.25
        imps.append(
            impression(request, ts, task, log.target_entity_id[shown].tolist(),
                       str(log.user_id[r]) or UNKNOWN_USER, query,
                       str(log.country[r]) or UNKNOWN_COUNTRY, source)
        )  # fmt: skip
        for i in shown[log.label[shown] == 1]:
            engs.append(engagement(f"{request}-{i}", request, str(log.target_entity_id[i]),
                                   "play", ts + 60))  # fmt: skip
    half = len(imps) // 2
    directory.mkdir(parents=True)
    write(directory / "impressions-a.parquet", imps[:half], IMPRESSION_SCHEMA)
    write(directory / "impressions-b.parquet", imps[half:], IMPRESSION_SCHEMA)
    write(directory / "engagements-a.parquet", engs, ENGAGEMENT_SCHEMA)


@pytest.mark.slow  # trains a model (about 7 s on 2 cores)
def test_cli_build_bundle_from_events(
    fast_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch", reason="building a bundle needs the train extra (torch)")
    from app.core.bundle import load_bundle

    events = tmp_path / "events"
    world_events(events)
    out = tmp_path / "bundles" / "events"
    argv = ["build-bundle", "--source", "events", "--path", str(events)]
    assert main([*argv, "--catalogue-from", str(fast_bundle), "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "event join:" in printed
    bundle = load_bundle(out)
    assert bundle.manifest["data"]["source"] == "events"
    assert bundle.manifest["model_name"].startswith("events-")
    assert all(n > 0 for n in bundle.manifest["data"]["rows_per_task"].values())


def test_reads_what_the_service_file_sink_writes(tmp_path: Path) -> None:
    from app.serving.events import ENGAGEMENT, IMPRESSION, FileSink

    sink = FileSink(tmp_path / "events", max_rows=2)  # two impression files
    sink.write(IMPRESSION, [impression("r1", T, "prequery", ["v1", "v2", "v3"]),
                            impression("r2", T + 1, "search", ["v4", "v1"], "u1", "blue sky"),
                            impression("r3", T + 2, "entity", ["v5"], source="genre:drama",
                                       query="drama")])  # fmt: skip
    sink.write(ENGAGEMENT, [engagement("e1", "r2", "v1", "click", T + 3),
                            engagement("e1", "r2", "v1", "click", T + 3)])  # fmt: skip
    sink.close()
    log, report = load_events(tmp_path / "events", catalogue=hand_catalogue())
    assert (report.impression_files, report.engagement_files) == (2, 1)
    assert (report.impressions_used, report.engagements_duplicate, report.positives) == (3, 1, 1)
    assert sorted(zip(log.task.tolist(), log.target_entity_id.tolist(), log.label.tolist(),
                      strict=True)) == [
        ("entity", "v5", 0), ("prequery", "v1", 0), ("prequery", "v2", 0),
        ("search", "v1", 1), ("search", "v4", 0),
    ]  # fmt: skip


@pytest.mark.slow  # trains a model (about 7 s on 2 cores)
def test_cli_build_bundle_warm_start_carries_the_item_space_over(
    fast_bundle: Path, tmp_path: Path
) -> None:
    """``--warm-start``: the new bundle has the earlier bundle's item vectors, clusters and
    neighbours (nothing pre-trained from the log), names the bundle it started from, and
    still learns its counts and its model from the events."""
    pytest.importorskip("torch", reason="building a bundle needs the train extra (torch)")
    from app.core.bundle import TABLES_FILE, load_bundle, read_manifest
    from app.core.feature_tables import FeatureTables

    events = tmp_path / "events"
    world_events(events)
    out = tmp_path / "bundles" / "warm"
    argv = ["build-bundle", "--source", "events", "--path", str(events), "--quick"]
    argv += ["--catalogue-from", str(fast_bundle), "--out", str(out)]
    assert main([*argv, "--warm-start", str(fast_bundle)]) == 0
    prior, new = (FeatureTables.load(b / TABLES_FILE) for b in (fast_bundle, out))
    assert np.array_equal(new.item_vec, prior.item_vec)
    assert np.array_equal(new.centroids, prior.centroids)
    assert np.array_equal(new.item_neighbours, prior.item_neighbours)
    assert not np.array_equal(new.entity_pos, prior.entity_pos)  # counts are the events'
    bundle = load_bundle(out)
    assert bundle.manifest["warm_start"] == read_manifest(fast_bundle)["model_version"]
    assert bundle.manifest["vocab"]["vec_dim"] == prior.vec_dim
    assert bundle.manifest["vocab"]["n_clusters"] == prior.n_clusters + 1


def test_warm_start_needs_the_same_catalogue(fast_bundle: Path) -> None:
    from handmade_bundle import WORLD

    from model_export.synthetic import WorldConfig, generate_world
    from model_export.training_pipeline import ItemSpace

    same = ItemSpace.of_bundle(fast_bundle, catalogue_from(fast_bundle))
    assert same.item_vec.shape[0] == len(catalogue_from(fast_bundle))
    other = generate_world(WorldConfig(**{**WORLD.__dict__, "n_videos": WORLD.n_videos - 5}))[0]
    with pytest.raises(ValueError, match="same entities in the same order"):
        ItemSpace.of_bundle(fast_bundle, other)
