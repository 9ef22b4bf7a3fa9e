"""The benchmark's BentoML peer (loadtest/peer.py): its feed is exactly what our scorer hands
onnxruntime, in every transport it offers, and the peer, started for real with ``bentoml
serve``, scores that feed as onnxruntime does (skipped only where BentoML, the ``peers``
extra, is not installed)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.core.bundle import MODEL_FILE, Bundle, load_bundle
from app.core.ranking import Ranker
from app.core.scoring import OnnxScorer
from loadtest import peer
from loadtest.processes import WRK, run_wrk
from loadtest.request_bodies import TASKS, rank_query, request_bodies

N = 500


class RecordingSession:
    """An onnxruntime session that keeps every feed ``run`` is handed."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.feeds: list[dict[str, np.ndarray]] = []

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> Any:
        self.feeds.append(feed)
        return self.session.run(outputs, feed)


@pytest.fixture(scope="module")
def bundle(fast_bundle: Path) -> Bundle:
    return load_bundle(fast_bundle)


def bodies_of(bundle: Bundle, task: str, n: int = 3) -> list[dict[str, Any]]:
    try:
        return request_bodies(bundle, task, n, seed=12)
    except ValueError as exc:  # a bundle without the pages of that task
        pytest.skip(f"{task}: {exc}")


def scorer_feeds(bundle: Bundle, bodies: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """What ``OnnxScorer.score`` handed onnxruntime while our ranker ranked ``bodies``."""
    session = RecordingSession(bundle.scorer.session)
    scorer, ranker = OnnxScorer(session), Ranker(bundle, max_retrieved=N)
    for body in bodies:
        ranker.rank(rank_query(body), scorer=scorer.score)
    assert len(session.feeds) == len(bodies)
    return session.feeds


def decode(transport: str, body: bytes, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed a peer API reads from a request ``body`` (as its service code does)."""
    if transport in ("raw", "raw_async"):
        return peer.decode_raw(body)
    if transport == "npz":
        return peer.decode_npz(body)
    if transport == "multipart":  # the one file part's content, as BentoML hands it over
        head, _, rest = body.partition(b"\r\n\r\n")
        assert b'name="feed"' in head
        return peer.decode_raw(rest.removesuffix(f"\r\n--{peer.BOUNDARY}--\r\n".encode()))
    assert transport == "json"  # BentoML's DType validator: np.asarray(list, dtype)
    return {k: np.asarray(v, dtype=like[k].dtype) for k, v in json.loads(body).items()}


@pytest.mark.parametrize("task", TASKS)
def test_every_transport_carries_exactly_the_feed_our_scorer_runs(
    bundle: Bundle, task: str
) -> None:
    bodies = bodies_of(bundle, task)
    expected, feeds = scorer_feeds(bundle, bodies), peer.feeds(bundle, bodies, N)
    assert set(peer.ENCODERS) == set(peer.TRANSPORTS)
    for want, feed in zip(expected, feeds, strict=True):
        assert list(feed) == bundle.scorer.input_names == list(want)
        for transport, encode in peer.ENCODERS.items():
            got = decode(transport, encode(feed), want)
            assert list(got) == list(want), transport
            for name, array in want.items():
                assert got[name].dtype == array.dtype, (transport, name)
                assert got[name].shape == array.shape, (transport, name)
                np.testing.assert_array_equal(got[name], array, err_msg=f"{transport} {name}")


def test_the_raw_feed_is_aligned_and_refuses_what_it_is_not(bundle: Bundle) -> None:
    (feed,) = peer.feeds(bundle, bodies_of(bundle, "search", 1), N)
    body = peer.encode_raw(feed)
    assert len(body) % peer.ALIGN == 0
    views = peer.decode_raw(body)
    assert all(not v.flags.writeable for v in views.values())  # views of the body, no copy
    with pytest.raises(ValueError, match="magic"):
        peer.decode_raw(b"XXXX" + body[4:])
    with pytest.raises(ValueError, match="trailing"):
        peer.decode_raw(body + b"\0" * 8)


def test_the_service_module_has_one_typed_json_parameter_per_input(bundle: Bundle) -> None:
    (feed,) = peer.feeds(bundle, bodies_of(bundle, "search", 1), N)
    source = peer.service_source(feed)
    compile(source, peer.SERVICE_MODULE, "exec")
    for name, array in feed.items():
        assert f'{name}: Annotated[np.ndarray, DType("{array.dtype.name}")]' in source
    for transport in peer.TRANSPORTS.values():
        assert f"def {transport.route.lstrip('/')}(" in source


@pytest.mark.slow
@pytest.mark.integration
def test_the_bentoml_peer_scores_as_onnxruntime_does(bundle: Bundle, tmp_path: Path) -> None:
    pytest.importorskip(
        "bentoml", reason="the peer needs the peers extra: pip install -e '.[peers]'"
    )
    feeds = [f for task in TASKS for f in peer.feeds(bundle, bodies_of(bundle, task, 2), N)]
    with peer.PeerServer(bundle.path / MODEL_FILE, feeds[0], tmp_path / "peer") as server:
        for transport in peer.TRANSPORTS:
            for feed in feeds:
                got, want = server.score(transport, feed), bundle.scorer.score(feed)
                assert got.shape == want.shape, transport
                assert np.allclose(got, want, rtol=1e-5, atol=1e-6), transport
        if Path(WRK).exists():  # wrk drives it through peer.lua and the body files
            manifest = server.request_files("raw", feeds, "test")
            url = server.url + peer.TRANSPORTS["raw"].route
            result = run_wrk(url, manifest, 2, 1, script=server.lua)
            assert result.requests > 0 and result.errors == 0


def peer_results(miss_rps: float, miss_p99: float) -> Any:
    """A ``Results`` holding only a peer section: the peer at 100 req/s and p99 10 ms on
    every task and concurrency, our hit at 1000 req/s and 1 ms, our miss as given."""
    from loadtest.bench_report import Results

    cells = []
    for task, conc, r in itertools.product(("search", "entity"), (1, 8), range(3)):
        for side, rps, p99 in (("peer", 100.0, 10.0), ("ours miss", miss_rps, miss_p99),
                               ("ours hit", 1000.0, 1.0)):  # fmt: skip
            cells.append(
                {"task": task, "conc": conc, "side": side, "round": r, "rps": rps + r,
                 "p50": p99 / 2, "p99": p99, "errors": 0, "status_errors": 0,
                 "server_cpu": 1.0, "wrk_cpu": 0.01} | ({"purity": 1.0} if side != "peer" else {})
            )  # fmt: skip
    race = [
        {"task": "search", "conc": conc, "side": "peer", "transport": name, "round": 0,
         "rps": rps, "p50": 1.0, "p99": 2.0, "errors": 0, "server_cpu": 1.0, "wrk_cpu": 0.01}
        for conc in (1, 8) for name, rps in (("raw", 100.0), ("json", 50.0))
    ]  # fmt: skip
    info = {
        "bentoml": "1.4.0", "bundle": "demo", "n": N, "feeds": 16, "seconds": 1, "rounds": 3,
        "race_rounds": 1, "candidates": {"search": 500.0, "entity": 480.0},
        "body_bytes": {"raw": 82360, "json": 260475}, "transport": "raw",
        "transports": {"raw": "raw bytes", "json": "JSON"},
    }  # fmt: skip
    machine = {"cpu": "a CPU", "cores": 2, "python": "3.11", "onnxruntime": "1", "numpy": "2",
               "wrk": "wrk 4", "load_at_start": (1.0,)}  # fmt: skip
    res = Results("now", "python -m loadtest.bench --sections peer", machine)
    res.peer = {"info": info, "transports": race, "cells": cells}
    return res


@pytest.mark.parametrize(
    ("miss_rps", "miss_p99", "status"),
    [(400.0, 5.0, "**met**"), (400.0, 20.0, "**missed**"), (50.0, 5.0, "**missed**")],
)
def test_the_peer_section_and_its_target_follow_the_figures(
    miss_rps: float, miss_p99: float, status: str
) -> None:
    from loadtest.bench_report import render, section_peer, target_peer

    res = peer_results(miss_rps, miss_p99)
    text = section_peer(res, 1)
    assert text in render(res, 1) and f"| {status} |" in render(res, 1)  # and the targets
    assert "| **raw** | raw bytes | 82360 | 100 | 1.00 | 2.00 | 100 |" in text
    assert "| search | 1 | 101 |" in text  # medians of the rounds
    assert f"{(miss_rps + 1) / 101:.2f}x" in text  # our miss / peer req/s
    ((target, measured, got),) = target_peer(res)
    assert "concurrency 1 and 8" in str(target)
    assert "c1:" in str(measured) and "c8:" in str(measured)
    assert got == status
