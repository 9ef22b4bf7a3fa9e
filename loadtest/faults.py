"""Fault injection under continuous load: the table of docs/RELIABILITY.md, "Faults under
load", which says what each column means.

    .venv/bin/python -m loadtest.faults                          # every scenario
    .venv/bin/python -m loadtest.faults --only redis_killed reload --fault-seconds 2
    .venv/bin/python -m loadtest.faults --write docs/RELIABILITY.md

Each scenario starts what it needs (a throwaway redis-server, ``python -m app.http.server``
on free ports), drives an open-loop load of mixed ``/rank`` requests at a fixed rate
(``loadtest.open_loop.LoadRunner``), injects one fault and reports one row.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

from loadtest.open_loop import Check, LoadRunner, Sample, Window, summarise
from loadtest.processes import ROOT, RedisServer, ServiceProcess, metric, wait_until
from loadtest.request_bodies import mixed_bodies, rank_query

TOKEN = "faults-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Answers = dict[int, list[tuple[str, float]]]


# --- bundles and answers --------------------------------------------------------------------
def shift_model_scores(source: Path, target: Path, logit_shift: float = 0.5) -> Path:
    """A copy of bundle ``source`` whose model scores differently: ``logit_shift`` added
    to the bias of the last layer before the sigmoid (every score changes, the ranking
    does not); its model version, bound to the files, changes with them."""
    import onnx
    from onnx import numpy_helper

    from app.core.bundle import MANIFEST, MODEL_FILE, write_manifest

    shutil.copytree(source, target)
    model = onnx.load(str(target / MODEL_FILE))
    by_output = {o: n for n in model.graph.node for o in n.output}
    head = by_output["probability"]
    while head.op_type not in ("Gemm", "Add"):  # walk back through Sigmoid / Squeeze
        head = by_output[head.input[0]]
    bias_name = head.input[2] if head.op_type == "Gemm" else head.input[1]
    bias = next((i for i in model.graph.initializer if i.name == bias_name), None)
    if bias is None:
        raise ValueError(f"{source}: no initializer {bias_name!r} for the last layer's bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + logit_shift, bias_name))
    onnx.save(model, str(target / MODEL_FILE))
    write_manifest(target, json.loads((target / MANIFEST).read_text()))
    return target


def damaged_bundles(source: Path, directory: Path) -> dict[str, Path]:
    """Copies of ``source`` that must be refused: ``corrupt`` (a flipped byte),
    ``truncated`` (half of model.onnx, with a manifest re-hashed to match, so only the
    load can tell), ``incompatible`` (an unknown format version), ``bad_manifest``
    (not JSON)."""
    from app.core.bundle import MANIFEST, MODEL_FILE, write_manifest

    out: dict[str, Path] = {}
    for kind in ("corrupt", "truncated", "incompatible", "bad_manifest"):
        target = out[kind] = directory / kind
        shutil.copytree(source, target)
        model = target / MODEL_FILE
        manifest = json.loads((target / MANIFEST).read_text())
        data = bytearray(model.read_bytes())
        if kind == "corrupt":
            data[len(data) // 2] ^= 0xFF
            model.write_bytes(bytes(data))
        elif kind == "truncated":
            model.write_bytes(data[: len(data) // 2])
            write_manifest(target, manifest)
        elif kind == "incompatible":
            write_manifest(target, {**manifest, "format_version": 99})
        else:
            (target / MANIFEST).write_text('{"format_version": 1, "model_version": ')
    return out


def reference_answers(
    bundle: Path, bodies: Sequence[dict[str, Any]], max_retrieved: int = 300
) -> Answers:
    """What ``bundle``'s model answers for each body, scored in this process: the
    expectation a served answer of that model version must equal."""
    from app.core.bundle import load_bundle
    from app.core.ranking import Ranker

    ranker = Ranker(load_bundle(bundle), max_retrieved=max_retrieved)
    return {
        i: [(item.entity_id, item.score) for item in ranker.rank(rank_query(b)).items]
        for i, b in enumerate(bodies)
    }


def one_model_check(references: dict[str, Answers], tolerance: float = 1e-5) -> Check:
    """A ``LoadRunner`` check: every score of an answer equals what the model version the
    answer names scores for that request (no mixed-version answer)."""

    def check(index: int, data: dict[str, Any]) -> str | None:
        expected = references.get(str(data.get("model_version")))
        if expected is None:
            return f"unknown model version {data.get('model_version')!r}"
        got, want = [(i["entity_id"], i["score"]) for i in data["items"]], expected[index]
        if [e for e, _ in got] != [e for e, _ in want] or any(
            abs(a - b) > tolerance for (_, a), (_, b) in zip(got, want, strict=True)
        ):
            return "answer is not entirely from the model version it names"
        return None

    return check


# --- scenarios ----------------------------------------------------------------------------
@dataclass
class Row:
    fault: str
    sent: int
    failures: int
    p99_fault_ms: float
    recovery: str
    notes: str
    baseline_p99_ms: float = math.nan

    @classmethod
    def under_load(
        cls, fault: str, samples: Sequence[Sample], fault_start: float, fault_end: float,
        recovery: str, notes: str,
    ) -> Row:  # fmt: skip
        """The row of a fault injected into an open-loop load: every request counted,
        p99 while the fault was on and before it (n/a when it was on from the start)."""
        total, during = summarise(samples), summarise(samples, fault_start, fault_end)
        before = summarise(samples, 0, fault_start)
        return cls(fault, total.sent, total.failed, during.p99_ms, recovery, notes, before.p99_ms)


@dataclass
class Options:
    bundle: Path
    rate: float
    fault_s: float
    settle_s: float
    workdir: Path

    def server(self, **settings: Any) -> ServiceProcess:
        """A service on the bundle (not started), logging to a fresh file of the workdir."""
        fd, log = tempfile.mkstemp(suffix=".log", dir=self.workdir)
        os.close(fd)
        return ServiceProcess({"bundle": self.bundle, **settings}, log_path=Path(log))


def _bodies(server: ServiceProcess, n: int = 400) -> list[dict[str, Any]]:
    sample = server.get("/catalogue/sample", params={"n": 200, "seed": 1}).json()
    return mixed_bodies(sample, n, seed=1)


def _cache_state(server: ServiceProcess) -> str:
    return str(server.get("/readyz").json()["cache"])


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} ms"


def _redis_scenario(opts: Options, kind: str) -> Row:
    """Redis ``down_at_start`` | ``killed`` | ``paused`` | ``debug_sleep`` under load."""
    redis = RedisServer()
    server = opts.server(redis_url=redis.url)
    stall = None
    try:
        if kind != "down_at_start":
            redis.start()
        bodies = _bodies(server.start())
        errors0 = metric(server.metrics(), "unicorn_cache_errors_total")
        load = LoadRunner(server.url, bodies, opts.rate).start()
        if kind == "down_at_start":
            fault_start, degraded_seen = 0.0, _cache_state(server) == "degraded"
            time.sleep(opts.fault_s)
        else:
            time.sleep(opts.settle_s)
            fault_start, degraded_seen = load.now(), False
            if kind == "killed":
                redis.kill()
            elif kind == "paused":
                redis.pause()
            else:
                stall = redis.debug_sleep(opts.fault_s)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: _cache_state(server) == "degraded", opts.fault_s / 2)
                degraded_seen = True
            time.sleep(max(0.0, opts.fault_s - (load.now() - fault_start)))
        if kind in ("killed", "down_at_start"):
            redis.start()
        redis.resume()
        if stall is not None:
            stall.join()
        fault_end = load.now()
        recovery = wait_until(lambda: _cache_state(server) == "ok", 60, poll_s=0.05)
        hits = wait_until(
            lambda: summarise(load.samples, fault_end, where=lambda s: s.cache == "hit").sent > 0,
            30,
        )
        time.sleep(opts.settle_s)
        samples = load.stop()
        errors = metric(server.metrics(), "unicorn_cache_errors_total") - errors0
    finally:
        server.stop()
        redis.stop()
    names = {
        "down_at_start": f"Redis down at start ({opts.fault_s:g} s), then started",
        "killed": f"Redis killed under load, restarted after {opts.fault_s:g} s",
        "paused": f"Redis stalled: SIGSTOP for {opts.fault_s:g} s",
        "debug_sleep": f"Redis stalled: DEBUG SLEEP {opts.fault_s:g}",
    }
    during = summarise(samples, fault_start, fault_end)
    return Row.under_load(
        names[kind], samples, fault_start, fault_end,
        recovery=f"{recovery:.2f} s (first hit after {hits:.2f} s)",
        notes=f"/readyz said degraded: {'yes' if degraded_seen else 'NO'}; "
        f"cache errors counted: {errors:.0f}; max during fault {_ms(during.max_ms)}",
    )  # fmt: skip


def _reloads(
    opts: Options, targets: Sequence[Path], check: Callable[[list[dict[str, Any]]], Check | None]
) -> tuple[list[Sample], float, float, list[Any], str]:
    """``POST /admin/reload`` of each of ``targets`` in turn, spread over the fault window
    of a load: the samples, the window, the answers to the reloads, the version before."""
    paths = [str(p.resolve()) for p in (opts.bundle, *targets)]
    server = opts.server(admin_token=TOKEN, reload_root=os.path.commonpath(paths)).start()
    try:
        bodies = _bodies(server)
        version = server.get("/readyz").json()["model_version"]
        load = LoadRunner(server.url, bodies, opts.rate, check=check(bodies)).start()
        time.sleep(opts.settle_s)
        fault_start, answers = load.now(), []
        for target in targets:
            response = server.post("/admin/reload", json={"bundle": str(target)}, headers=AUTH)
            answers.append(response.json() if response.status_code == 200 else response)
            time.sleep(opts.fault_s / len(targets))
        fault_end = load.now()
        time.sleep(opts.settle_s)
        samples = load.stop()
        still = server.get("/readyz").json()["model_version"] == version
    finally:
        server.stop()
    return samples, fault_start, fault_end, answers, version if still else ""


def scenario_reload(opts: Options, reloads: int = 10) -> Row:
    """Reloads alternating between two models that score differently, under load; every
    answer is checked against the scores of the model version it names."""
    shifted = shift_model_scores(opts.bundle, opts.workdir / "shifted")

    def check(bodies: list[dict[str, Any]]) -> Check:
        version = {p: json.loads((p / "manifest.json").read_text())["model_version"]
                   for p in (opts.bundle, shifted)}  # fmt: skip
        return one_model_check({version[p]: reference_answers(p, bodies) for p in version})

    targets = [shifted if i % 2 == 0 else opts.bundle for i in range(reloads)]
    samples, start, end, answers, _ = _reloads(opts, targets, check)
    if not all(isinstance(a, dict) for a in answers):
        raise RuntimeError(f"a reload failed: {answers}")
    versions = {s.model_version for s in samples if s.model_version}
    mixed = sum(1 for s in samples if s.problem and "model version" in s.problem)
    return Row.under_load(
        f"Model reload x{reloads} under load (two models that score differently)",
        samples, start, end, recovery="none needed (no outage)",
        notes=f"mixed-version answers: {mixed}; versions served: {len(versions)}; "
        f"reload p50 {np.median([a['seconds'] for a in answers]):.2f} s",
    )  # fmt: skip


def scenario_bad_bundle_reload(opts: Options) -> Row:
    """Reloads of damaged bundles under load: each refused (409), the old model serves."""
    damaged = damaged_bundles(opts.bundle, opts.workdir / "damaged")
    samples, start, end, answers, version = _reloads(opts, list(damaged.values()), lambda _: None)
    statuses = sorted({200 if isinstance(a, dict) else a.status_code for a in answers})
    served = {s.model_version for s in samples if s.model_version}
    return Row.under_load(
        f"Reload of {', '.join(damaged)} bundles under load", samples, start, end,
        recovery="none needed (old model kept serving)",
        notes=f"reload statuses {statuses}; old model still serving: "
        f"{'yes' if version and served == {version} else 'NO'}",
    )  # fmt: skip


def scenario_bad_bundle_start(opts: Options) -> Row:
    """``unicorn serve`` on damaged bundles (1 and 2 workers): exit code and message."""
    outcomes, worst = [], 0.0
    for kind, path in damaged_bundles(opts.bundle, opts.workdir / "damaged-start").items():
        for workers in (1, 2):
            server = opts.server(bundle=path, workers=workers)
            started = time.monotonic()
            process = server.start(wait=False).process
            assert process is not None
            try:
                code = process.wait(120)
            finally:
                server.stop()
            worst = max(worst, time.monotonic() - started)
            clear = "cannot start" in server.log() and str(path) in server.log()
            outcomes.append(f"{kind}/{workers}w: exit {code}{'' if clear else ' UNCLEAR'}")
    return Row(
        "Corrupt / truncated / incompatible / bad-manifest bundle at start", 0, 0, math.nan,
        f"process exits within {worst:.1f} s", "; ".join(outcomes),
    )  # fmt: skip


def scenario_worker_killed(opts: Options) -> Row:
    """SIGKILL one of two workers under load; the supervisor starts a replacement."""
    server = opts.server(workers=2).start()
    try:
        load = LoadRunner(server.url, _bodies(server), opts.rate).start()
        time.sleep(opts.settle_s)
        victim, startups, fault_start = server.worker_pids()[0], server.startups(), load.now()
        os.kill(victim, signal.SIGKILL)
        recovery = wait_until(lambda: server.startups() > startups, 120, poll_s=0.05)
        fault_end = load.now()
        time.sleep(opts.settle_s)
        samples = load.stop()
        time.sleep(0.5)
        text = server.metrics()
    finally:
        server.stop()
    problems = summarise(samples).problems
    ok = sum(1 for s in samples if s.status == 200)
    return Row.under_load(
        "One of 2 workers killed (SIGKILL) under load", samples, fault_start, fault_end,
        recovery=f"replacement worker serving after {recovery:.2f} s",
        notes=f"failures are the requests in flight on the killed worker "
        f"({', '.join(f'{k}: {v}' for k, v in problems.items()) or 'none'}); "
        f"failures from 1 s after the kill: {summarise(samples, fault_start + 1.0).failed}; "
        f"in-flight gauge after: {metric(text, 'unicorn_in_flight_requests'):.0f}; /rank 200s "
        f"counted {metric(text, 'unicorn_responses_total', route='/rank', status='200'):.0f} "
        f"vs received {ok}",
    )  # fmt: skip


# --- overload -----------------------------------------------------------------------------
T = TypeVar("T")
OPEN_LOOP_RATE = 250.0  # req/s the open-loop overload offers (the Python client can)
OPEN_LOOP_RETRIEVED = 2000  # candidates per request: more than one worker serves


def rank_records(log: str) -> list[dict[str, Any]]:
    """The access-log records of ``/rank`` calls in a server's ``log`` (JSON lines)."""
    return [orjson.loads(x) for x in log.splitlines() if '"route":"/rank"' in x]


def handling_ms(log: str) -> dict[int, list[float]]:
    """The server's own handling time of each ``/rank`` call logged on its own line, by
    status (a door's summary line of refusals, ``"refused": N``, has none: ``logged``)."""
    out: dict[int, list[float]] = {}
    for record in rank_records(log):
        if "latency_ms" in record:
            out.setdefault(int(record["status"]), []).append(float(record["latency_ms"]))
    return out


def logged(log: str, status: int) -> int:
    """``/rank`` calls with ``status`` the access log accounts for: a line each, or a
    door's summary line of ``refused`` of them."""
    return sum(int(r.get("refused", 1)) for r in rank_records(log) if r["status"] == status)


def _handling_p99(log: str, status: int) -> float:
    """p99 of the server's own handling time of ``/rank`` calls with ``status``."""
    values = handling_ms(log).get(status, [])
    return float(np.percentile(values, 99)) if values else math.nan


def _overload_run(
    opts: Options, settings: dict[str, Any], overload: Callable[[ServiceProcess, list[Any]], T]
) -> tuple[Window, T, str]:
    """One worker with ``settings`` (cache off): 20 req/s below capacity, then
    ``overload(server, bodies)``; the below-capacity window, what ``overload`` returned
    and the server log."""
    server = opts.server(cache_enabled=False, **settings).start()
    try:
        bodies = _bodies(server)
        with LoadRunner(server.url, bodies, 20).running() as base:
            time.sleep(opts.fault_s)
        baseline = summarise(base.stop(), 0.5)
        return baseline, overload(server, bodies), server.log()
    finally:
        server.stop()


def _overload_row(
    fault: str, sent: int, failures: int, samples: list[Sample], log: str, baseline: Window,
    served: str,
) -> Row:  # fmt: skip
    """The row of an overload run; the notes describe the accepted and the shed calls of
    ``samples`` (open-loop calls timed end to end)."""
    accepted = summarise(samples, where=lambda s: s.status == 200)
    shed = summarise(samples, where=lambda s: s.shed)
    return Row(
        fault, sent, failures, accepted.p99_ms, "immediate (nothing queued)",
        f"{served}accepted {accepted.sent}, p50 {_ms(accepted.p50_ms)} / p99 "
        f"{_ms(accepted.p99_ms)} end to end; shed {shed.sent} "
        f"({shed.sent / max(len(samples), 1):.0%}, 503 + Retry-After), p50 {_ms(shed.p50_ms)} / "
        f"p99 {_ms(shed.p99_ms)}; server handling p99: 200 {_ms(_handling_p99(log, 200))}, "
        f"503 {_ms(_handling_p99(log, 503))}",
        baseline.p99_ms,
    )  # fmt: skip


def _overload_open_loop(opts: Options, label: str, extra: dict[str, Any]) -> Row:
    """``OPEN_LOOP_RATE`` offered open loop to one worker with 2,000 candidates a call."""

    def offer(server: ServiceProcess, bodies: list[Any]) -> list[Sample]:
        load = LoadRunner(server.url, bodies, OPEN_LOOP_RATE, connections=256, timeout_s=60)
        with load.running():
            time.sleep(2 * opts.fault_s)
        return load.stop()

    settings = {"max_retrieved": OPEN_LOOP_RETRIEVED, **extra}
    baseline, samples, log = _overload_run(opts, settings, offer)
    # served per second: over the time until the last answer (a queue drains late)
    seconds = max((s.at + s.latency for s in samples), default=math.nan)
    total, ok = summarise(samples), sum(1 for s in samples if s.status == 200)
    row = _overload_row(
        f"Overload, open loop: {OPEN_LOOP_RATE:.0f} req/s offered to one worker (cache off, "
        f"{OPEN_LOOP_RETRIEVED} candidates per call), {label}",
        len(samples), total.failed - total.shed, samples, log, baseline,
        f"served {ok / seconds:.0f} req/s; ",
    )  # fmt: skip
    row.notes += f"; below capacity: p50 {_ms(baseline.p50_ms)} / p99 {_ms(baseline.p99_ms)}"
    return row


def _overload_flood(opts: Options, label: str, extra: dict[str, Any], connections: int) -> Row:
    """``wrk`` keeps ``connections`` calls outstanding and sends the next the moment an
    answer (a 503 too) arrives, while a probe client sends 20 req/s open loop and times
    every call end to end."""
    from loadtest.processes import run_wrk, write_bodies

    def flood(server: ServiceProcess, bodies: list[Any]) -> tuple[Any, list[Sample]]:
        probe = LoadRunner(server.url, bodies, 20, timeout_s=30).start()
        data = write_bodies(opts.workdir / "overload.jsonl", bodies)
        seconds = max(1, round(2 * opts.fault_s))
        return run_wrk(server.url + "/rank", data, connections, seconds, timeout_s=10), probe.stop()

    baseline, (wrk, samples), log = _overload_run(opts, extra, flood)
    probe = summarise(samples)
    return _overload_row(
        f"Overload, closed loop: wrk {connections} connections retrying at once + a 20 req/s "
        f"probe, one worker (cache off), {label}",
        wrk.requests + len(samples), wrk.socket_errors + probe.failed - probe.shed, samples, log,
        baseline,
        f"served {(wrk.requests - wrk.status_errors) / wrk.seconds:.0f} req/s, "
        f"{wrk.status_errors / max(wrk.requests, 1):.0%} of wrk's calls shed; wrk (all calls) "
        f"p50 {wrk.p50_ms:.0f} / p99 {wrk.p99_ms:.0f} ms, {wrk.socket_errors} timeouts/errors; "
        "probe: ",
    )  # fmt: skip


MULTIPLES = (3, 5, 10)  # x the measured capacity, offered by the raw open-loop client


def _capacity(opts: Options) -> float:
    """/rank calls a second one worker (cache off, defaults) serves to 4 closed-loop
    connections (wrk: below the slots, nothing shed)."""
    from loadtest.processes import run_wrk, write_bodies

    server = opts.server(cache_enabled=False).start()
    try:
        data = write_bodies(opts.workdir / "capacity.jsonl", _bodies(server))
        run_wrk(server.url + "/rank", data, 2, 1)  # warm
        result = run_wrk(server.url + "/rank", data, 4, 4)
        return (result.requests - result.status_errors) / result.seconds
    finally:
        server.stop()


def _overload_multiple(opts: Options, multiple: float, capacity: float) -> Row:
    """``multiple`` x ``capacity`` offered open loop (``RawLoadRunner``, pinned to one core,
    the server to the other) to one worker with the defaults, cache off; the slots seen
    (``unicorn_scoring_slots`` every 0.5 s), goodput, and the longest run of seconds
    without a served 200."""
    import threading

    from loadtest.open_loop import RawLoadRunner

    rate = multiple * capacity
    server = opts.server(cache_enabled=False)
    server.command = ["taskset", "-c", "0", *server.command]
    mask = os.sched_getaffinity(0)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {1} if len(mask) > 1 else mask)
    server.start()
    try:
        bodies = _bodies(server)
        with RawLoadRunner(server.url, bodies, 20).running() as base:
            time.sleep(opts.fault_s)
        baseline = summarise(base.stop(), 0.5)
        slots: list[float] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.5):
                with contextlib.suppress(Exception):
                    slots.append(metric(server.metrics(), "unicorn_scoring_slots"))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        seconds = 2 * opts.fault_s
        load = RawLoadRunner(server.url, bodies, rate, connections=450, timeout_s=15)
        with load.running():
            time.sleep(seconds)
        samples = load.stop()
        stop.set()
        poller.join()
        log = server.log()
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, mask)
    done = [s.at + s.latency for s in samples if s.status == 200]
    per_second = np.bincount(np.array(done, dtype=int), minlength=int(seconds))[1 : int(seconds)]
    streak = longest = 0
    for count in per_second:
        streak = streak + 1 if count == 0 else 0
        longest = max(longest, streak)
    shed = summarise(samples, where=lambda s: s.shed)
    total = summarise(samples)
    row = _overload_row(
        f"Overload, open loop: {multiple:g}x capacity ({rate:.0f} req/s; capacity "
        f"{capacity:.0f} req/s measured) offered to one worker (cache off), defaults",
        len(samples), total.failed - total.shed, samples, log, baseline,
        f"goodput {len(done) / seconds:.0f} req/s ({len(done) / seconds / capacity:.0%} of "
        f"capacity), longest run without a 200: {longest} s; scoring slots max "
        f"{max(slots, default=math.nan):.0f}; ",
    )  # fmt: skip
    row.notes += (
        f"; shed max {_ms(shed.max_ms)}; below capacity: p50 {_ms(baseline.p50_ms)} / p99 "
        f"{_ms(baseline.p99_ms)}"
    )
    return row


def scenario_overload_multiples(opts: Options) -> list[Row]:
    """Open loop at ``MULTIPLES`` x one worker's measured capacity (default candidates):
    the bound of docs/API.md, "Admission control", at 3x, 5x and 10x."""
    capacity = _capacity(opts)
    return [_overload_multiple(opts, multiple, capacity) for multiple in MULTIPLES]


def scenario_overload(opts: Options, connections: int = 128) -> list[Row]:
    """Load above the capacity of one worker: open loop (a fixed arrival rate, which
    admission control is for), then a closed-loop flood of clients that retry the moment
    they are refused; each with the defaults, one slot, uvloop, and (open loop) admission
    control effectively off."""
    one, uvloop = {"max_in_flight": 1}, {"event_loop": "uvloop"}
    return [
        *scenario_overload_multiples(opts),
        _overload_open_loop(opts, "defaults (max_in_flight=4, queue_timeout_ms=100)", {}),
        _overload_open_loop(opts, "max_in_flight=1", one),
        _overload_open_loop(opts, "uvloop", uvloop),
        _overload_open_loop(
            opts, "admission control off (queue_timeout_ms=60000)", {"queue_timeout_ms": 60000}
        ),
        _overload_flood(opts, "defaults (max_in_flight=4)", {}, connections),
        _overload_flood(opts, "max_in_flight=1", one, connections),
        _overload_flood(opts, "uvloop", uvloop, connections),
    ]


SCENARIOS: dict[str, Callable[[Options], Row | list[Row]]] = {
    **{
        f"redis_{kind}": functools.partial(_redis_scenario, kind=kind)
        for kind in ("down_at_start", "killed", "paused", "debug_sleep")
    },
    "reload": scenario_reload,
    "bad_bundle_reload": scenario_bad_bundle_reload,
    "bad_bundle_start": scenario_bad_bundle_start,
    "worker_killed": scenario_worker_killed,
    "overload": scenario_overload,
    "overload_multiples": scenario_overload_multiples,
}
# Scenarios that another one runs as its part: left out of "every scenario".
PARTS = frozenset({"overload_multiples"})


def main(argv: list[str] | None = None) -> int:
    from loadtest.markdown import table, write_block

    parser = argparse.ArgumentParser(
        prog="python -m loadtest.faults", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--bundle", type=Path, default=ROOT / "bundles/demo")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--fault-seconds", type=float, default=5.0)
    parser.add_argument("--settle-seconds", type=float, default=3.0)
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="scenarios to run")
    parser.add_argument("--write", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        parser.error(f"{args.bundle} is not a bundle (build one: unicorn build-bundle ...)")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="unicorn-faults-") as tmp:
        opts = Options(args.bundle, args.rate, args.fault_seconds, args.settle_seconds, Path(tmp))
        for name in args.only or [n for n in SCENARIOS if n not in PARTS]:
            print(f"-- {name}", file=sys.stderr, flush=True)
            produced = SCENARIOS[name](opts)
            for row in produced if isinstance(produced, list) else [produced]:
                print(f"   {row}", file=sys.stderr, flush=True)
                rows.append(row)
    headers = (
        "fault injected|requests sent|failures|p99 before|p99 during fault|recovery time|notes"
    )
    cells = [
        [r.fault, r.sent, r.failures, _ms(r.baseline_p99_ms), _ms(r.p99_fault_ms), r.recovery,
         r.notes] for r in rows
    ]  # fmt: skip
    command = shlex.join(["python", "-m", "loadtest.faults", *(argv or sys.argv[1:])])
    body = (
        f"{table(headers, cells, align='lrrrrll')}\n\nGenerated by `{command}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} ({os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end; bundle `{args.bundle.name}`; {args.rate:g} req/s "
        "open loop).\n"
    )
    print(body)
    if args.write:
        write_block(args.write, "faults", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
