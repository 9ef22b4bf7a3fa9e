"""Model variants (app/serving/variants.py, ``UNICORN_VARIANTS``): the spec's rules, a
sticky salted-hash split, and on a real server: the variant in the answer, the access log,
the impression events, the latency metrics and the cache key; each variant reloaded on its
own and verified as before."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_TOKEN, LiveServer, copy_bundle, model_version

from app.serving.config import Settings
from app.serving.variants import BUCKETS, VariantSpec, VariantSplit, parse_variants

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PREQUERY = {"task": "prequery", "k": 5, "personalization": "none"}


# --- the spec -----------------------------------------------------------------------------
def test_entries_without_a_percent_share_the_rest() -> None:
    specs = parse_variants("champion=bundles/a, challenger=bundles/b:10", Path("x"))
    assert specs == (
        VariantSpec("champion", Path("bundles/a"), 90.0),
        VariantSpec("challenger", Path("bundles/b"), 10.0),
    )
    three = parse_variants("a=p1,b=p2,c=p3:40", Path("x"))
    assert [s.percent for s in three] == [30.0, 30.0, 40.0]
    assert parse_variants("", Path("bundles/demo")) == (
        VariantSpec("default", Path("bundles/demo"), 100.0),
    )
    # a colon that is not followed by a number belongs to the path
    assert parse_variants("a=/mnt/x:y", Path("x"))[0].bundle == Path("/mnt/x:y")


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("a=p1:60,b=p2:50", "sum to 110"),
        ("a=p1:60,b=p2:40,c=p3", "nothing is left for c"),
        ("a=p1:50,b=p2:30", "sum to 80"),
        ("a=p1,a=p2", "unique"),
        ("Champion=p1", "must be 1-32 of"),
        ("shadow=p1", "not be 'shadow'"),
        ("a=p1:0", "percent must be in (0, 100]"),
        ("a", "name=path[:percent]"),
        ("a=", "name=path[:percent]"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_rule(text: str, rule: str) -> None:
    with pytest.raises(ValueError, match="variants") as info:
        parse_variants(text, Path("x"))
    assert rule in str(info.value)
    with pytest.raises(ValueError, match="variants"):
        Settings(variants=text)  # the service refuses to start on it


# --- the split ----------------------------------------------------------------------------
def test_the_split_is_sticky_salted_and_close_to_the_shares() -> None:
    specs = parse_variants("champion=a,challenger=b:10", Path("x"))
    split = VariantSplit(specs, "salt-1")
    users = [f"u{i}" for i in range(20_000)]
    first = [split.assign(u) for u in users]
    # another process (a worker, a replica) with the same salt assigns alike
    assert [VariantSplit(specs, "salt-1").assign(u) for u in users] == first
    shares = Counter(first)
    assert abs(shares["challenger"] / len(users) - 0.10) < 0.01, shares
    # a new salt reshuffles: about 18% of members change (10% x 90% both ways)
    moved = sum(
        a != VariantSplit(specs, "salt-2").assign(u) for u, a in zip(users, first, strict=True)
    )
    assert 0.14 < moved / len(users) < 0.22, moved
    assert split.assign(None) == split.assign("") == split.assign("  ") == "champion"
    # the identity rule of app.core.context: surrounding whitespace is not part of the id
    assert all(split.assign(f" {u}\t") == a for u, a in zip(users[:500], first, strict=False))
    # growing the challenger's share only moves members from the champion to it
    wider = VariantSplit(parse_variants("champion=a,challenger=b:20", Path("x")), "salt-1")
    assert all(
        wider.assign(u) == "challenger"
        for u, a in zip(users, first, strict=True)
        if a == "challenger"
    )
    assert 0 <= split.bucket("u1") < BUCKETS


# --- on a real server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def challenger(tmp_path_factory: pytest.TempPathFactory, fast_bundle: Path) -> Path:
    return copy_bundle(fast_bundle, tmp_path_factory.mktemp("challenger") / "c", retrained=True)


@pytest.fixture
def two_variants(
    settings_for: Callable[..., Settings], fast_bundle: Path, challenger: Path
) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        spec = f"champion={fast_bundle},challenger={challenger}:50"
        return settings_for(variants=spec, admin_token=ADMIN_TOKEN, **overrides)

    return make


def _user_in(variant: str, settings: Settings) -> str:
    split = VariantSplit(settings.variant_specs, settings.variant_salt)
    return next(u for u in (f"member-{i}" for i in range(1000)) if split.assign(u) == variant)


def test_a_member_stays_in_one_variant_on_every_server(
    start_server: Callable[[Settings], LiveServer],
    two_variants: Callable[..., Settings],
    fast_bundle: Path,
    challenger: Path,
    read_metric: Callable[..., float],
) -> None:
    settings = two_variants()
    replicas = [start_server(settings), start_server(settings)]
    versions = {"champion": model_version(fast_bundle), "challenger": model_version(challenger)}
    seen: dict[str, set[str]] = {}
    for i in range(40):
        user = f"member-{i}"
        for server in replicas:
            with server.client() as client:
                for _ in range(2):
                    body = client.post("/rank", json={**PREQUERY, "user_id": user}).json()
                    assert body["model_version"] == versions[body["variant"]]
                    seen.setdefault(user, set()).add(body["variant"])
    assert all(len(v) == 1 for v in seen.values()), seen  # sticky across requests and replicas
    assert {v for (v,) in seen.values()} == {"champion", "challenger"}  # both get members
    with replicas[0].client() as client:
        ready = client.get("/readyz").json()
        assert ready["variants"] == versions and ready["model_version"] == versions["champion"]
        anonymous = client.post("/rank", json=PREQUERY).json()
        assert anonymous["variant"] == "champion"
        text = client.get("/metrics").text
    for variant, version in versions.items():
        assert read_metric(text, "unicorn_model_info", variant=variant, model_version=version) == 1
        count = "unicorn_rank_latency_seconds_count"
        assert read_metric(text, count, variant=variant, task="prequery") > 0, variant
        assert read_metric(text, "unicorn_stage_latency_seconds_count", variant=variant) >= 0


def test_a_request_may_name_its_variant_and_each_variant_has_its_own_cache_entries(
    start_server: Callable[[Settings], LiveServer],
    two_variants: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = two_variants()
    server = start_server(settings)
    member = _user_in("champion", settings)
    with server.client() as client, caplog.at_level(logging.INFO, logger="unicorn.access"):
        asked = client.post("/rank", json={**PREQUERY, "user_id": member, "variant": "challenger"})
        assert (asked.json()["variant"], asked.json()["cache"]) == ("challenger", "miss")
        # the same context (personalization none: cluster 0 for all) on the other variant is
        # a miss, not the challenger's entry; then each variant hits its own
        answers = [
            client.post("/rank", json={**PREQUERY, "variant": v}).json()
            for v in ("champion", "challenger", "champion")
        ]
        assert [(a["variant"], a["cache"]) for a in answers] == [
            ("champion", "miss"), ("challenger", "hit"), ("champion", "hit"),
        ]  # fmt: skip
        bad = client.post("/rank", json={**PREQUERY, "variant": "nope"})
    assert bad.status_code == 422
    error = bad.json()["error"]
    assert error["field"] == "variant" and "champion, challenger" in error["message"]
    lines = [r.access for r in caplog.records if hasattr(r, "access")]
    ranked = [line for line in lines if line.get("route") == "/rank" and line["status"] == 200]
    assert [line["variant"] for line in ranked[:1]] == ["challenger"]
    assert {line["variant"] for line in ranked} == {"champion", "challenger"}


def test_each_variant_reloads_on_its_own_and_is_verified(
    start_server: Callable[[Settings], LiveServer],
    two_variants: Callable[..., Settings],
    fast_bundle: Path,
    challenger: Path,
    second_bundle: Path,
    tampered_bundle: Path,
) -> None:
    server = start_server(two_variants())
    champion, old = model_version(fast_bundle), model_version(challenger)
    with server.client() as client:
        moved = client.post(
            "/admin/reload", json={"variant": "challenger", "bundle": str(second_bundle)},
            headers=AUTH,
        )  # fmt: skip
        assert moved.status_code == 200, moved.text
        assert moved.json()["variant"] == "challenger"
        assert moved.json()["previous_model_version"] == old
        new = model_version(second_bundle)
        assert client.get("/readyz").json()["variants"] == {"champion": champion, "challenger": new}
        answer = client.post("/rank", json={**PREQUERY, "variant": "challenger"}).json()
        assert answer["model_version"] == new
        # a refused bundle leaves that variant serving what it served
        refused = client.post(
            "/admin/reload", json={"variant": "challenger", "bundle": str(tampered_bundle)},
            headers=AUTH,
        )  # fmt: skip
        assert refused.status_code == 409 and "sha256" in refused.json()["error"]["message"]
        assert client.get("/readyz").json()["variants"]["challenger"] == new
        # a bodiless reload is the champion's, from its configured bundle
        again = client.post("/admin/reload", headers=AUTH).json()
        assert (again["variant"], again["model_version"]) == ("champion", champion)
        unknown = client.post("/admin/reload", json={"variant": "nope"}, headers=AUTH)
        assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "variant"


@pytest.mark.anyio
async def test_impressions_name_the_variant_that_answered(
    two_variants: Callable[..., Settings], running_app: Callable[[Settings], Any], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from app.serving.events import complete_files

    settings = two_variants(events_dir=tmp_path / "events")
    async with running_app(settings) as (_app, client):
        answers = [
            (await client.post("/rank", json={**PREQUERY, "variant": v})).json()
            for v in ("champion", "challenger", "challenger")
        ]
    rows = {
        row["request_id"]: row
        for f in complete_files(tmp_path / "events", "impression")
        for row in pq.read_table(f).to_pylist()
    }
    for answer in answers:
        row = rows[answer["request_id"]]
        assert (row["variant"], row["model_version"]) == (
            answer["variant"],
            answer["model_version"],
        )


def test_the_documented_example_splits_as_the_docs_say() -> None:
    """docs/API.md's UNICORN_VARIANTS line: champion 90%, challenger 10%."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "API.md").read_text()
    line = next(x for x in doc.splitlines() if x.startswith("UNICORN_VARIANTS="))
    text = line.removeprefix("UNICORN_VARIANTS=").split()[0]
    specs = parse_variants(text, Path("unused"))
    assert [(s.name, s.percent) for s in specs] == [("champion", 90.0), ("challenger", 10.0)]


def test_the_settings_module_loads_no_numpy() -> None:
    """``loadtest.bench`` sets numpy's BLAS threads after importing the settings: the
    settings (and the variants' spec rules they apply) must not load numpy."""
    import subprocess
    import sys

    code = "import sys, app.serving.config; assert 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
