"""The benchmark report's targets follow the figures they are given (fabricated cells):
each is marked met or missed by its own threshold, never by default."""

from __future__ import annotations

import pytest

from loadtest.bench_report import (
    HttpRow,
    Results,
    section_curves,
    target_catalogue,
    target_off_state,
    target_redis_hits,
    target_workers,
)


def row(
    backend: str, workers: int, case: str, conc: int, p99: float, rps: float, errors: int = 0
) -> HttpRow:
    return HttpRow(
        "demo", 500, "search", case, backend, workers, conc, p99 / 2, p99, rps, errors, 0.1, 1.0,
        1.0, 500.0, extra={"worker_cpu": [0.5, 0.5]} if workers == 2 else {}, seconds=2.0,
    )  # fmt: skip


def results(**fields: object) -> Results:
    return Results("2026-12-02", "test", {"cpus": 2}, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("redis_p99", "status"), [(1.9, "**met**"), (2.1, "**missed**")])
def test_redis_hits_target_is_the_worst_p99_ratio(redis_p99: float, status: str) -> None:
    http = [row(b, 1, "hit", c, p, 1000.0) for c in (1, 8, 32)
            for b, p in (("memory", 1.0), ("redis", redis_p99 if c == 8 else 1.2))]  # fmt: skip
    (got,) = target_redis_hits(results(http=http))
    assert got[2] == status and f"c8: worst {redis_p99:.2f}x" in str(got[1])


@pytest.mark.parametrize(("two", "status"), [(1.85, "**met**"), (1.7, "**missed**")])
def test_workers_target_is_the_worst_two_to_one_ratio(two: float, status: str) -> None:
    ratio = {8: 1.9, 32: two}
    http = [row("memory", w, "miss", c, 10.0, 100.0 * ratio[c] ** (w - 1))
            for c in (8, 32) for w in (1, 2)]  # fmt: skip
    (got,) = target_workers(results(http=http))
    assert got[2] == status and f"worst {two:.2f}x" in str(got[1])


def test_workers_target_compares_goodput_not_fast_503s() -> None:
    # one worker "serves" 1000 req/s at c32, 900 of them 503s (1800 errors in 2 s): its
    # goodput is 100/s, so two workers answering 190/s without errors is 1.9x, met
    http = [row("memory", 1, "miss", 8, 10.0, 100.0), row("memory", 2, "miss", 8, 10.0, 190.0),
            row("memory", 1, "miss", 32, 10.0, 1000.0, errors=1800),
            row("memory", 2, "miss", 32, 10.0, 190.0)]  # fmt: skip
    (got,) = target_workers(results(http=http))
    assert got[2] == "**met**" and "worst 1.90x" in str(got[1])


def test_goodput_needs_the_cell_length() -> None:
    cell = row("memory", 1, "miss", 8, 10.0, 100.0)
    assert cell.goodput == 100.0
    with pytest.raises(ValueError, match="no cell length"):
        _ = HttpRow(**{**cell.__dict__, "seconds": 0.0}).goodput


@pytest.mark.parametrize(("big_p99", "status"), [(1.25, "**met**"), (1.4, "**missed**")])
def test_catalogue_target_compares_the_largest_with_the_smallest(
    big_p99: float, status: str
) -> None:
    catalogue = [
        {"task": t, "bundle": b, "p50": 1.0, "p99": p}
        for t in ("search", "prequery")
        for b, p in (("demo", 1.0), ("ml", 1.1), ("big", big_p99 if t == "search" else 1.0))
    ]
    res = results(catalogue=catalogue, bundle_info={"demo": {"entities": 2276}})
    (got,) = target_catalogue(res)
    assert got[2] == status and f"worst {big_p99:.2f}x (search)" in str(got[1])
    assert "demo (2276 entities)" in section_curves(res, 1)


def test_off_state_rows_compare_each_option_on_with_its_default() -> None:
    def cell(option: str, value: object, conc: int, rps: float) -> HttpRow:
        r = row("memory", 1, "hit", conc, 1.0, rps)
        return HttpRow(**{**r.__dict__, "extra": {"option": option, "value": value}})

    http = [
        cell("cors", "off", 1, 1000.0),
        cell("cors", "on", 1, 900.0),
        cell("gzip_min_bytes", 0, 1, 1000.0),
        cell("gzip_min_bytes", 4096, 1, 950.0),
    ]
    http += [
        cell("shadow", "off", 1, 1000.0),
        cell("shadow", 0.1, 1, 980.0),
        cell("shadow", 1.0, 1, 700.0),
    ]
    cors, gzip, shadow = target_off_state(results(http=http))
    assert "CORS" in str(cors[0]) and "goodput 0.90x" in str(cors[1])
    assert "gzip" in str(gzip[0]) and "goodput 0.95x" in str(gzip[1])
    assert "shadow" in str(shadow[0])
    assert "hit c1 (0.1): p50 0.50 -> 0.50 ms, goodput 0.98x" in str(shadow[1])
    assert "hit c1 (1.0): p50 0.50 -> 0.50 ms, goodput 0.70x" in str(shadow[1])
