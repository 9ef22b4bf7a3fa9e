"""The benchmark's results and their report: the generated block of docs/BENCHMARKS.md,
one function per section (``render``), and the targets table, one function per target."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.markdown import table

CANDIDATE_COUNTS = (100, 500, 1000)
PATH_COUNTS = (*CANDIDATE_COUNTS, 2000)  # the in-process path's curve against candidates
TARGET_N = 500
NAN = float("nan")
Rows = list[list[object]]


@dataclass
class HttpRow:
    bundle: str
    n: int
    task: str
    case: str  # miss | hit | floor B
    backend: str
    workers: int
    conc: int
    p50: float
    p99: float
    rps: float
    errors: int
    wrk_cpu: float
    server_cpu: float
    purity: float  # fraction of requests with the intended cache outcome (nan: n/a)
    candidates: float  # mean candidates scored (nan when nothing was scored)
    outcomes: dict[str, float] = field(default_factory=dict)  # cache outcome counts
    extra: dict[str, Any] = field(default_factory=dict)  # CPU split; option and value
    seconds: float = 0.0  # the cell's length as wrk measured it

    @property
    def goodput(self) -> float:
        """Answers per second that were not errors: under overload a 503 from admission
        control is fast and counts in ``rps``, so throughput is compared on this."""
        if self.seconds <= 0:
            raise ValueError(f"no cell length recorded for {self.bundle} {self.task} c{self.conc}")
        return max(self.rps - self.errors / self.seconds, 0.0)


@dataclass
class Results:
    started: str
    command: str
    machine: dict[str, Any]
    log: list[str] = field(default_factory=list)
    inprocess: list[dict[str, Any]] = field(default_factory=list)
    sessions: dict[str, dict[int, Any]] = field(default_factory=dict)
    http: list[HttpRow] = field(default_factory=list)
    rss: list[dict[str, Any]] = field(default_factory=list)
    serialisation: dict[str, float] = field(default_factory=dict)
    scale: list[dict[str, Any]] = field(default_factory=list)
    bundle_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    # the BentoML peer (loadtest/peer.py): "info", "transports" (race cells), "cells"
    peer: dict[str, Any] = field(default_factory=dict)
    # in-process p50/p99 at TARGET_N per task and bundle, bundles interleaved
    catalogue: list[dict[str, Any]] = field(default_factory=list)

    def grid(self, at_target: bool = True) -> list[HttpRow]:
        """The HTTP cells that are not option measurements, at (or off) ``TARGET_N``."""
        return [r for r in self.http if "option" not in r.extra and (r.n == TARGET_N) == at_target]

    def options(self, name: str | None = None) -> list[HttpRow]:
        return [r for r in self.http if "option" in r.extra and name in (None, r.extra["option"])]


def load_results(path: Path) -> Results:
    """``Results`` from the JSON ``loadtest/bench.py`` writes (to re-render a report)."""
    raw = json.loads(path.read_text())
    raw["http"] = [HttpRow(**row) for row in raw["http"]]
    raw["sessions"] = {k: {int(n): d for n, d in v.items()} for k, v in raw["sessions"].items()}
    return Results(**raw)


def pick(obj: Any, names: str) -> list[object]:
    """The attributes (or keys, of a dict) ``names`` of ``obj``."""
    return [obj[n] if isinstance(obj, dict) else getattr(obj, n) for n in names.split()]


def cpu_text(r: HttpRow) -> str:
    """Server CPU (cores), with the split per worker when there are several."""
    per = r.extra.get("worker_cpu") or []
    split = f" ({' + '.join(f'{x:.2f}' for x in per)})" if len(per) > 1 else ""
    return f"{r.server_cpu:.2f}{split}"


def purity_text(r: HttpRow) -> str:
    others = ", ".join(f"{k} {v:.0f}" for k, v in r.outcomes.items() if v and k != r.case)
    if r.purity != r.purity:
        return "-"
    return f"{r.purity:.3f}" + (f" ({others})" if r.purity < 0.99 else "")


def cands(r: HttpRow) -> object:
    return "-" if r.candidates != r.candidates else round(r.candidates)


def hit_ratios(grid: list[HttpRow], conc: int = 0) -> list[tuple[float, HttpRow, HttpRow]]:
    """``(hit req/s / Floor B req/s, hit cell, Floor B cell)`` of the cache-hit cells (at
    ``conc``; 0 = all), against the Floor B cell of the same bundle, workers and conc."""
    floors = {(f.bundle, f.workers, f.conc): f for f in grid if f.case == "floor B"}
    hits = [r for r in grid if r.case == "hit" and conc in (0, r.conc)]
    return [(r.rps / f.rps, r, f) for r in hits if (f := floors.get((r.bundle, r.workers, r.conc)))]


# --- sections ------------------------------------------------------------------------------
def section_header(res: Results, _: int) -> str:
    m, others = res.machine, [r.extra["other_cpu"] for r in res.http if "other_cpu" in r.extra]
    text = (
        f"Generated {res.started} by\n\n    {res.command}\n\n"
        f"in {res.seconds / 60:.1f} min on {m['cpu']} ({m['cores']} cores, shared and noisy: "
        f"load average {m['load_at_start'][0]:.1f} at the start, "
        f"{m.get('load_at_end', (NAN,))[0]:.1f} at the end), Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, numpy {m['numpy']}, {m['wrk']}. Latencies in ms; "
        f"every ratio compares numbers measured in this same run."
    )
    if others:
        text += (
            f" Other processes on the machine kept {statistics.median(others):.2f} cores busy "
            f"during the median HTTP cell (max {max(others):.2f}): the service had what was "
            f"left of the 2 cores."
        )
    notes = "".join(f"\n- {line}" for line in res.log)
    return text + (f"\n\nNotes from the run:\n{notes}" if notes else "")


def section_bundles(res: Results, _: int) -> str:
    keys = "bundle model_version entities rankable users_in_tables queries model_mb"
    headers = "bundle|model|entities|rankable|users (tables)|queries|model MiB"
    return "### Bundles\n\n" + table(headers, [pick(b, keys) for b in res.bundle_info.values()])


def section_inprocess(res: Results, _: int) -> str:
    rows = [
        [*pick(r, "bundle n task"), round(r["candidates"]),
         *pick(r, "floor_p50 floor_p99 path_p50 path_p99"), f"{r['ratio']:.2f}x",
         *pick(r, "impute_p50 retrieval_p50 features_p50 score_p50 topk_p50")]
        for r in res.inprocess
    ]  # fmt: skip
    headers = ("bundle|N|task|cands|floor A p50|floor A p99|path p50|path p99|path/floor p50"
               "|impute|retrieval|features|score|top-k")  # fmt: skip
    return (
        "### 1-2. Floor A (onnxruntime run) and the in-process ranking path\n\n"
        "Floor A and the path are timed on the same requests, alternately. Stages are "
        "p50s: impute = context imputation; retrieval = context features + candidate "
        "retrieval; features = candidate features; score = `OnnxScorer.score` (Floor A "
        "plus feed building); top-k = `Ranker.finish`.\n\n" + table(headers, rows, 3)
    )


def section_sessions(res: Results, _: int) -> str:
    base = next(iter(res.sessions.values()))
    rows = [
        [name, *(x for n in CANDIDATE_COUNTS
                 for x in (d[n]["p50"], d[n]["p99"], f"{d[n]['p50'] / base[n]['p50']:.2f}x"))]
        for name, d in res.sessions.items()
    ]  # fmt: skip
    headers = ["session options"]
    for n in CANDIDATE_COUNTS:
        headers += [f"N={n} p50", f"N={n} p99", "vs default"]
    return (
        "### onnxruntime session options (bundle demo, search inputs, configs interleaved)\n\n"
        + table(headers, rows, 3)
    )


def section_http(res: Results, seconds_per_cell: int) -> str:
    rows = [
        [*pick(r, "bundle task case backend workers conc p50 p99"), round(r.rps), r.errors,
         r.wrk_cpu, cpu_text(r), r.extra.get("redis_cpu", 0.0) or "-",
         r.extra.get("other_cpu", NAN), purity_text(r), cands(r)]
        for r in res.grid()
    ]  # fmt: skip
    ratios = [
        [*pick(r, "bundle task backend workers conc"), round(r.rps), round(f.rps), f"{x:.0%}"]
        for x, r, f in hit_ratios(res.grid())
    ]
    headers = ("bundle|task|case|cache|workers|conc|p50|p99|req/s|errors|wrk CPU|server CPU"
               "|redis CPU|other CPU|purity|cands")  # fmt: skip
    ratio_headers = "bundle|task|cache|workers|conc|hit req/s|floor B req/s|hit / floor B"
    return (
        f"### 3-4. HTTP: Floor B and `POST /rank` at N={TARGET_N} (wrk, closed loop, "
        f"{seconds_per_cell:g} s per cell)\n\n"
        "`conc` = wrk connections (one wrk thread). `wrk CPU`, `server CPU` (per worker in "
        "brackets) and `redis CPU` are cores busy during the cell (1.00 = one core); `other "
        "CPU` = cores kept busy by everything else on the machine meanwhile (noise). "
        "`purity` = share of requests with the intended cache outcome per the server's "
        "own counters (the other outcomes in brackets: `bypass` = the cache circuit breaker "
        "was open); `cands` = mean candidates scored per scored request.\n\n"
        f"{table(headers, rows)}\n\n"
        "#### Cache-hit throughput against Floor B (same server, same run)\n\n"
        + table(ratio_headers, ratios)
    )


def section_candidates(res: Results, _: int) -> str:
    rows = [
        [*pick(r, "bundle n task case conc p50 p99"), round(r.rps), r.errors, cands(r)]
        for r in res.grid(at_target=False)
    ]
    return "#### `/rank` search at 100 and 1000 candidates (1 worker, in-process cache)\n\n" + (
        table("bundle|N|task|case|conc|p50|p99|req/s|errors|cands", rows)
    )


def rss_text(r: dict[str, Any]) -> str:
    return ", ".join(f"{x:.0f}" for x in r["rss_mib"])


def section_rss(res: Results, _: int) -> str:
    rows = [[*pick(r, "bundle workers backend case"), rss_text(r)] for r in res.rss]
    headers = "bundle|workers|cache|server|RSS per worker"
    return "### RSS per worker (MiB, after the cells)\n\n" + table(headers, rows)


def section_options(res: Results, _: int) -> str:
    rows = [
        [r.extra["option"], r.extra["value"], *pick(r, "task case workers conc p50 p99"),
         round(r.rps), r.errors, cpu_text(r), r.extra.get("other_cpu", NAN)]
        for r in res.options()
    ]  # fmt: skip
    headers = "option|value|task|case|workers|conc|p50|p99|req/s|errors|server CPU|other CPU"
    return (
        f"### Serving options (bundle {res.options()[0].bundle}, N={TARGET_N}, in-process "
        "cache)\n\n`batch_window_ms` 0 = inference inline on the event loop (default); 0.01 = "
        "through the micro-batcher's thread-pool hop with (almost) no wait; 1 and 2 = "
        "batching windows.\n\n" + table(headers, rows)
    )


def section_serialisation(res: Results, _: int) -> str:
    s = res.serialisation
    rows: Rows = [
        [f"encode a k=20 response ({s['response_bytes']:.0f} bytes)", s["encode_orjson_us"],
         s["encode_json_us"], f"{s['encode_json_us'] / s['encode_orjson_us']:.1f}x"],
        ["parse + validate a RankRequest (`model_validate_json`)", s["parse_pydantic_json_us"],
         s["parse_json_then_validate_us"],
         f"{s['parse_json_then_validate_us'] / s['parse_pydantic_json_us']:.1f}x"],
        ["  (orjson.loads + model_validate)", s["parse_orjson_then_validate_us"], "", ""],
    ]  # fmt: skip
    headers = "what|orjson / pydantic-core|stdlib json|speed-up"
    return "### Serialisation, per `/rank` call (µs, best of 5)\n\n" + table(headers, rows)


def section_curves(res: Results, _: int) -> str:
    """The in-process path's p50 against catalogue size and against candidates."""
    parts = []
    if res.catalogue:
        names = list(dict.fromkeys(r["bundle"] for r in res.catalogue))
        size = {n: res.bundle_info.get(n, {}).get("entities", "?") for n in names}
        rows = [
            [task, *(next((f"{r['p50']:.3f} / {r['p99']:.3f}" for r in res.catalogue
                           if r["task"] == task and r["bundle"] == n), "-") for n in names)]
            for task in dict.fromkeys(r["task"] for r in res.catalogue)
        ]  # fmt: skip
        headers = ["task", *(f"{n} ({size[n]} entities)" for n in names)]
        parts.append(
            f"In-process path p50 / p99 (ms) at N={TARGET_N} against catalogue size (the "
            "bundles interleaved, the same request mix per task):\n\n" + table(headers, rows)
        )
    for bundle in dict.fromkeys(r["bundle"] for r in res.inprocess):
        at = [r for r in res.inprocess if r["bundle"] == bundle]
        counts = sorted({r["n"] for r in at})
        rows = [
            [task, *(next((f"{r['path_p50']:.3f}" for r in at
                           if r["task"] == task and r["n"] == n), "-") for n in counts)]
            for task in dict.fromkeys(r["task"] for r in at)
        ]  # fmt: skip
        parts.append(
            f"In-process path p50 (ms) against candidates, bundle {bundle} (from the table "
            "above):\n\n" + table(["task", *(f"N={n}" for n in counts)], rows)
        )
    return "### Curves: catalogue size and candidates\n\n" + "\n\n".join(parts)


def scale_ratio(r: dict[str, Any]) -> float:
    return float(r["big_p99"] / r["demo_p99"])


def section_scale(res: Results, _: int) -> str:
    rows = [
        [*pick(sc, "where n task"), sc.get("conc", "-"),
         *pick(sc, "demo_p50 demo_p99 big_p50 big_p99"), f"{scale_ratio(sc):.2f}x"]
        for sc in res.scale
    ]  # fmt: skip
    headers = "where|N|task|conc|demo p50|demo p99|big p50|big p99|big/demo p99"
    title = "### 5. Default world vs the 1M-user / 100k-entity world (interleaved)"
    return f"{title}\n\n{table(headers, rows)}"


# --- the peer (BentoML serving model.onnx, score only) ----------------------------------------
PEER_SIDES = ("peer", "ours miss", "ours hit")
PEER_METRICS = ("rps", "p50", "p99", "server_cpu")
PQ = "p50 p99"


def peer_medians(rows: list[dict[str, Any]], *keys: str) -> dict[tuple[Any, ...], dict[str, float]]:
    """Median req/s, p50, p99, server CPU and total errors of the rows grouped by ``keys``."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return {
        key: {m: statistics.median(r[m] for r in group) for m in PEER_METRICS}
        | {"errors": sum(r["errors"] for r in group), "runs": len(group)}
        for key, group in groups.items()
    }


def section_peer(res: Results, _: int) -> str:
    info, race = res.peer["info"], peer_medians(res.peer["transports"], "transport", "conc")
    chosen = info["transport"]
    race_rows = [
        [f"**{name}**" if name == chosen else name, about, info["body_bytes"].get(name, NAN),
         *(x for c in (1, 8) for x in (round(race[name, c]["rps"]), *pick(race[name, c], PQ)))]
        for name, about in info["transports"].items() if (name, 1) in race and (name, 8) in race
    ]  # fmt: skip
    cells, rows = peer_medians(res.peer["cells"], "task", "conc", "side"), []
    for task, conc in dict.fromkeys((r["task"], r["conc"]) for r in res.peer["cells"]):
        d = {side: cells.get((task, conc, side)) for side in PEER_SIDES}
        peer, miss, hit = d["peer"], d["ours miss"], d["ours hit"]
        if peer is None or miss is None or hit is None:
            continue
        rows.append(
            [task, conc, *(round(x["rps"]) for x in (peer, miss, hit)),
             *(f"{x['p50']:.2f} / {x['p99']:.2f}" for x in (peer, miss, hit)),
             f"{miss['rps'] / peer['rps']:.2f}x", f"{peer['p99'] / miss['p99']:.2f}x",
             f"{hit['rps'] / peer['rps']:.2f}x", f"{peer['p99'] / hit['p99']:.2f}x",
             " / ".join(f"{x['server_cpu']:.2f}" for x in (peer, miss, hit)),
             " / ".join(str(int(x["errors"])) for x in (peer, miss, hit))]
        )  # fmt: skip
    purity = [r["purity"] for r in res.peer["cells"] if r.get("purity", NAN) == r.get("purity")]
    race_headers = "transport|what|body bytes|c1 req/s|c1 p50|c1 p99|c8 req/s|c8 p50|c8 p99"
    headers = ("task|conc|peer req/s|miss req/s|hit req/s|peer p50 / p99|miss p50 / p99"
               "|hit p50 / p99|miss / peer req/s|peer / miss p99|hit / peer req/s"
               "|peer / hit p99|server CPU peer / miss / hit|errors peer / miss / hit")  # fmt: skip
    cands = ", ".join(f"{t} {n:.0f}" for t, n in info["candidates"].items())
    return (
        f"### 6. A peer: BentoML {info['bentoml']} serving model.onnx (score only) vs "
        f"`POST /rank` (bundle {info['bundle']}, N={info['n']})\n\n"
        "The peer is the bundle's `model.onnx` under BentoML (`loadtest/peer.py`, "
        "`bentoml serve`, one worker, one API thread), onnxruntime with the service's session "
        "options (intra 1, inter 1, sequential, no spinning, optimisation all). Each of its "
        "requests carries a ready feed: the model inputs our service builds for one `/rank` "
        f"request at N={info['n']} (the first {info['feeds']} bodies of the miss set per task; "
        f"candidates per feed: {cands}); it answers the N scores. **The work differs**: the "
        "peer only decodes the feed and runs onnxruntime; our miss parses and validates the "
        "JSON request, imputes the context, retrieves the candidates, builds their features, "
        "scores them, takes the top k and encodes the answer (plus the cache get and set); "
        "our hit parses the request and returns the cached answer.\n\n"
        f"Transports tried (search feeds, {info['race_rounds']} rounds alternated, "
        f"{info['seconds']} s per run, medians); the fastest by the geometric mean of its c1 "
        f"and c8 req/s (**{chosen}**) is used below. BentoML's pickle transport "
        "(`application/vnd.bentoml+pickle`) is refused by a service's entry server.\n\n"
        f"{table(race_headers, race_rows)}\n\n"
        f"Our miss and hit servers (1 worker, in-process cache) and the peer ran at the same "
        f"time, in rounds of one {info['seconds']} s wrk run each (order rotated every round; "
        f"medians of {info['rounds']} rounds). `req/s` counts successful answers only; "
        "`errors` = wrk's errors over the rounds, HTTP statuses >= 400 included (our admission "
        "control answers 503 when it sheds); `server CPU` = cores the server's process tree "
        f"kept busy. Cache purity of our cells: min {min(purity, default=NAN):.3f}. Ratios "
        "above 1 favour us.\n\n" + table(headers, rows)
    )


def section_targets(res: Results, _: int) -> str:
    rows = [row for target in TARGETS for row in target(res)]
    return "### Targets\n\n" + table(["target", "measured", "status"], rows)


# Each section with what decides whether it is shown (something measured for it).
SECTIONS: tuple[tuple[Callable[[Results, int], str], Callable[[Results], object]], ...] = (
    (section_header, bool), (section_bundles, lambda r: r.bundle_info),
    (section_inprocess, lambda r: r.inprocess), (section_sessions, lambda r: r.sessions),
    (section_http, Results.grid), (section_candidates, lambda r: r.grid(at_target=False)),
    (section_rss, lambda r: r.rss), (section_options, Results.options),
    (section_serialisation, lambda r: r.serialisation), (section_scale, lambda r: r.scale),
    (section_curves, lambda r: r.catalogue or r.inprocess),
    (section_peer, lambda r: r.peer.get("cells")), (section_targets, bool),
)  # fmt: skip


def render(res: Results, seconds_per_cell: int) -> str:
    """The generated block of docs/BENCHMARKS.md."""
    shown = [section for section, measured in SECTIONS if measured(res)]
    return "\n\n".join(section(res, seconds_per_cell) for section in shown)


# --- targets: each gives the rows it can fill from what was measured -------------------------
def met(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def is_default(r: HttpRow) -> bool:
    """The default serving configuration: 1 worker, in-process cache."""
    return r.workers == 1 and r.backend == "memory"


def cell_text(r: HttpRow, value: str) -> str:
    return f"{r.bundle} {r.backend} w{r.workers} {value}"


def target_path(res: Results) -> Rows:
    at = [r for r in res.inprocess if r["n"] == TARGET_N]
    if not at:
        return []
    worst = max(at, key=lambda r: r["ratio"])
    search = ", ".join(f"{r['bundle']} {r['ratio']:.2f}x" for r in at if r["task"] == "search")
    detail = "; ".join(f"{r['bundle']} {r['task']} {r['ratio']:.2f}x" for r in at)
    measured = f"worst {worst['ratio']:.2f}x ({worst['bundle']} {worst['task']}); search: "
    return [
        ["in-process path p50 <= 1.5x Floor A at 500 candidates (every task)",
         f"{measured}{search}. All: {detail}", met(worst["ratio"] <= 1.5)]
    ]  # fmt: skip


def target_latency(res: Results) -> Rows:
    rows: Rows = []
    for case, limit in (("miss", 10.0), ("hit", 2.0)):
        cells = [r for r in res.grid() if r.task == "search" and r.case == case and r.conc == 1]
        primary = [r for r in cells if is_default(r)]
        if primary:
            p99s = ["; ".join(cell_text(r, f"{r.p99:.2f}") for r in cells if is_default(r) == d)
                    for d in (True, False)]  # fmt: skip
            rows.append(
                [f"/rank search cache {case}, 500 candidates, concurrency 1: p99 <= {limit:g} ms "
                 "(default serving: 1 worker, in-process cache)",
                 f"{p99s[0]}. Other configurations: {p99s[1]}",
                 met(max(r.p99 for r in primary) <= limit)]
            )  # fmt: skip
    return rows


def target_hit_throughput(res: Results) -> Rows:
    top = max((x.conc for x in res.grid()), default=0)
    ratios = hit_ratios(res.grid(), top)
    primary = [(x, r) for x, r, _ in ratios if is_default(r)]
    if not primary:
        return []
    worst, wr = min(primary, key=lambda x: x[0])
    each = "; ".join(f"{r.bundle} {r.task} {x:.0%}" for x, r in primary)
    others = "; ".join(
        cell_text(r, f"{x:.0%}") for x, r, _ in ratios if r.task == "search" and not is_default(r)
    )
    return [
        [f"cache-hit throughput >= 80% of Floor B (conc {top}, every task; default serving: 1 "
         "worker, in-process cache)",
         f"worst {worst:.0%} ({wr.bundle} {wr.task}); {each}. Other configurations, search: "
         f"{others}", met(worst >= 0.8)]
    ]  # fmt: skip


def target_scale(res: Results) -> Rows:
    if not res.scale:
        return []
    parts = []
    for where in dict.fromkeys(sc["where"] for sc in res.scale):
        group = [sc for sc in res.scale if sc["where"] == where]
        w = max(group, key=scale_ratio)
        conc = f" c{w['conc']}" if "conc" in w else ""
        median = statistics.median(map(scale_ratio, group))
        parts.append(
            f"{where}: worst {scale_ratio(w):.2f}x ({w['task']} N={w['n']}{conc}), "
            f"median {median:.2f}x"
        )
    big = [
        f"w{r['workers']} {r['case']}: {rss_text(r)} MiB" for r in res.rss if r["bundle"] == "big"
    ]
    rows: Rows = [
        ["1M-user world p99 within 1.3x of the default world (same N)", "; ".join(parts),
         met(max(map(scale_ratio, res.scale)) <= 1.3)],
    ]  # fmt: skip
    if big:
        rows.append(["1M-user world RSS documented", "; ".join(big), "**met** (documented)"])
    return rows


def target_sessions(res: Results) -> Rows:
    p50 = {k: v[TARGET_N]["p50"] for k, v in res.sessions.items()}
    if not p50:
        return []
    best = min(p50, key=p50.__getitem__)
    return [
        ["session options chosen by measurement",
         f"fastest at N={TARGET_N}: {best} ({p50[best]:.3f} ms) vs default "
         f"{next(iter(p50.values())):.3f} ms", "**met** (recorded above)"]
    ]  # fmt: skip


def target_batching(res: Results) -> Rows:
    batching, parts = res.options("batch_window_ms"), []
    for w in sorted({r.workers for r in batching}):
        for conc in sorted({r.conc for r in batching}):
            cells = ", ".join(
                f"{r.extra['value']:g} ms {r.p50:.1f}/{r.p99:.1f}/{r.rps:.0f}"
                for r in batching
                if r.workers == w and r.conc == conc
            )
            parts.append(f"w{w} c{conc} p50/p99/req/s: {cells}")
    measured = "; ".join(parts)
    return [["micro-batching on/off measured", measured, "**met** (recorded above)"]] * bool(parts)


def target_stack(res: Results) -> Rows:
    stack, s = res.options("loop/http"), res.serialisation
    if not (stack and s):
        return []
    cells = ", ".join(f"{r.extra['value']} {r.case} c{r.conc} {r.rps:.0f}/s" for r in stack)
    return [
        ["orjson responses, event loop and HTTP parser measured",
         f"{cells}; orjson encodes a 20-item response in {s['encode_orjson_us']:.1f} µs vs "
         f"{s['encode_json_us']:.1f} µs (json)", "**met** (recorded above)"]
    ]  # fmt: skip


def target_peer(res: Results) -> Rows:
    cells = peer_medians(res.peer.get("cells", []), "task", "conc", "side")
    pairs = [
        (task, conc, m, p)
        for (task, conc, side), m in cells.items()
        if side == "ours miss" and (p := cells.get((task, conc, "peer")))
    ]
    if not pairs:
        return []
    concs = sorted({c for _, c, _, _ in pairs})
    parts, ok = [], {1, 8} <= set(concs)
    for conc in concs:
        at = [(t, m["rps"] / p["rps"], p["p99"] / m["p99"]) for t, c, m, p in pairs if c == conc]
        ok = ok and all(rps > 1.0 and p99 > 1.0 for _, rps, p99 in at)
        w_rps, w_p99 = min(at, key=lambda x: x[1]), min(at, key=lambda x: x[2])
        parts.append(
            f"c{conc}: miss / peer req/s worst {w_rps[1]:.2f}x ({w_rps[0]}), peer / miss p99 "
            f"worst {w_p99[2]:.2f}x ({w_p99[0]})"
        )
    transport = res.peer["info"]["transport"]
    return [
        ["our miss beats the peer's score-only request on req/s and p99 at concurrency 1 and 8 "
         f"(BentoML, {transport} transport, every task; above 1x = ours better)",
         "; ".join(parts), met(ok)]
    ]  # fmt: skip


def target_redis_hits(res: Results) -> Rows:
    """Redis hits as steady as in-process hits: p99 ratio per bundle, workers, task, conc."""
    grid = [r for r in res.grid() if r.case == "hit"]
    memory = {(r.bundle, r.workers, r.task, r.conc): r for r in grid if r.backend == "memory"}
    pairs = [
        (r.p99 / m.p99, r)
        for r in grid
        if r.backend == "redis" and (m := memory.get((r.bundle, r.workers, r.task, r.conc)))
    ]
    if not pairs:
        return []
    parts = []
    for conc in sorted({r.conc for _, r in pairs}):
        at = [(x, r) for x, r in pairs if r.conc == conc]
        worst, wr = max(at, key=lambda p: p[0])
        parts.append(
            f"c{conc}: worst {worst:.2f}x ({wr.bundle} w{wr.workers} {wr.task}), median "
            f"{statistics.median(x for x, _ in at):.2f}x"
        )
    return [
        ["Redis cache-hit p99 <= 2x the in-process cache-hit p99 at concurrency 1, 8 and 32 "
         "(same bundle, workers and task)", "; ".join(parts),
         met(max(x for x, _ in pairs) <= 2.0)]
    ]  # fmt: skip


def target_workers(res: Results) -> Rows:
    """Two workers against one on cache misses at concurrency 8 and 32, every cell, by
    goodput: one worker at concurrency 32 sheds part of the load as fast 503s."""
    grid = [r for r in res.grid() if r.case == "miss" and r.conc in (8, 32)]
    one = {(r.bundle, r.backend, r.task, r.conc): r for r in grid if r.workers == 1}
    pairs = [
        (r.goodput / o.goodput, r)
        for r in grid
        if r.workers == 2 and (o := one.get((r.bundle, r.backend, r.task, r.conc)))
    ]
    if not pairs:
        return []
    worst, wr = min(pairs, key=lambda p: p[0])
    splits = [
        min(per) / max(per)
        for _, r in pairs
        if len(per := r.extra.get("worker_cpu") or []) > 1 and max(per) > 0
    ]
    split = (
        f"; the less busy worker's CPU / the busier's: worst {min(splits):.2f}, median "
        f"{statistics.median(splits):.2f}"
        if splits
        else ""
    )
    return [
        ["2 workers >= 1.8x one worker's miss goodput (answers that were not errors, per "
         "second) at concurrency 8 and 32 (every cell)",
         f"worst {worst:.2f}x ({wr.bundle} {wr.backend} {wr.task} c{wr.conc}), median "
         f"{statistics.median(x for x, _ in pairs):.2f}x over {len(pairs)} cells{split}",
         met(worst >= 1.8)]
    ]  # fmt: skip


def target_catalogue(res: Results) -> Rows:
    """The in-process curve's ratio of the largest catalogue to the smallest."""
    if not res.catalogue:
        return []
    by = {(r["bundle"], r["task"]): r for r in res.catalogue}
    names = list(dict.fromkeys(r["bundle"] for r in res.catalogue))
    small, large = names[0], names[-1]
    ratios = [
        (by[large, t]["p99"] / by[small, t]["p99"], t)
        for t in dict.fromkeys(r["task"] for r in res.catalogue)
        if (large, t) in by and (small, t) in by
    ]
    if not ratios:
        return []
    worst, wt = max(ratios)
    each = "; ".join(f"{t} {x:.2f}x" for x, t in ratios)
    return [
        [f"in-process path p99, {large} within 1.3x of {small} at N={TARGET_N} (every task)",
         f"worst {worst:.2f}x ({wt}); {each}", met(worst <= 1.3)]
    ]  # fmt: skip


def target_events(res: Results) -> Rows:
    """What logging an impression per answer costs /rank (events on against off)."""
    cells = {(r.case, r.conc, r.extra["value"]): r for r in res.options("events")}
    parts = [
        f"{case} c{conc}: p50 {off.p50:.2f} -> {on.p50:.2f} ms, "
        f"goodput {on.goodput / off.goodput:.2f}x"
        for (case, conc, value), off in cells.items()
        if value == "off" and (on := cells.get((case, conc, "on")))
    ]
    if not parts:
        return []
    return [
        ["cost of the impression log on /rank measured (Parquet file sink on vs events off)",
         "; ".join(parts), "**met** (recorded above)"]
    ]  # fmt: skip


OFF_STATE_OPTIONS = (
    ("cors", "off", "CORS"), ("gzip_min_bytes", 0, "the gzip layer"),
    ("tracing", "off", "tracing"), ("variants", "off", "two variants"),
    ("shadow", "off", "shadow scoring"), ("explain", "off", "explain"),
)  # fmt: skip


def target_off_state(res: Results) -> Rows:
    """What each optional layer costs /rank when on, against off (the default), from the
    same run."""
    rows: Rows = []
    for option, off, label in OFF_STATE_OPTIONS:
        cells = {(r.case, r.conc, r.extra["value"]): r for r in res.options(option)}
        parts = [
            f"{case} c{conc}{'' if value == 'on' else f' ({value})'}: p50 {base.p50:.2f} -> "
            f"{on.p50:.2f} ms, goodput {on.goodput / base.goodput:.2f}x"
            for (case, conc, base_value), base in cells.items()
            if base_value == off
            for (c1, c2, value), on in cells.items()
            if (c1, c2) == (case, conc) and value != off
        ]
        if parts:
            rows.append([f"cost of {label} on /rank measured (on vs off, the default)",
                         "; ".join(parts), "**met** (recorded above)"])  # fmt: skip
    return rows


TARGETS = (
    target_path, target_latency, target_hit_throughput, target_redis_hits, target_workers,
    target_scale, target_catalogue, target_sessions, target_batching, target_stack, target_peer,
    target_events, target_off_state,
)  # fmt: skip
