"""``unicorn evaluate``: the paper's comparisons on one split, written to
``docs/evaluation_<source>.json`` and rendered with the other source's results into
``docs/EVALUATION.md``.

Per seed: the unified model (one model, three personalization levels) and the same
architecture trained per task on that task's rows only. Once per run (they have no
training randomness): the baselines and the LambdaMART anchor (``model_export.lambdamart``,
trained on the same rows). All of them on the same test impressions and the same retrieved
candidates, with search also split into title and tag queries; then the behavioural checks
of ``model_export.evaluate`` (relevance guard at every level, typos, prefixes, taste), on
requests sampled with the data seed, so seeds differ only in training.

JSON layout (``evaluation_<source>.json``)::

    source, command, data, test_impressions, seconds, timings
    lambdamart: {config, stats}
    checks: {relevance_guard: {pairs}, typo: {titles, queries, examples},
             prefix: {titles}, taste: {thresholds, qualifying, members, mean_train_share,
             mean_base_share, genres}}
    per_seed: [{seed,
                results: {system: {task | search_title | search_tag: {ndcg@10, ...}}},
                relevance_guard: {system: {pairs, top1_share}},
                typo_check: {system: {kind | overall: {n, top1, top3, retrieved}}},
                prefix_check: {system: {"3" | "4" | "5": {n, top3, top10, retrieved}}},
                taste_check: {system: {genre_share@20, n}},
                train, per_task_train_seconds}]

Baseline and LambdaMART entries are the same in every seed (their ± is 0). NaN (an empty
subset) is written as null.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from app.core.context import TASKS, Personalization
from model_export.bundle_builder import baseline_systems, model_systems
from model_export.evaluate import (
    BASELINES,
    PREFIX_LENGTHS,
    SEARCH_TAG,
    SEARCH_TITLE,
    TYPO_KINDS,
    System,
    evaluate_systems,
    prefix_check,
    relevance_guards,
    taste_check,
    test_impressions,
    typo_check,
)
from model_export.lambdamart import LambdaMARTConfig, train_lambdamart
from model_export.train import TrainConfig
from model_export.training_pipeline import (
    PipelineConfig,
    load_source,
    prepare,
    train_unicorn,
    training_rows,
)

METRICS = ("ndcg@10", "recall@10", "mrr")
RECS = ("prequery", "more_like_this", "entity")
LEVELS = tuple(level.value for level in Personalization)
UNIFIED = tuple(f"unified ({level})" for level in LEVELS)
LAMBDAMART = ("lambdamart (none)", "lambdamart (full)")
BASELINE_NAMES = tuple(name for name, _, _ in BASELINES)
ROW_TASKS = ("search", SEARCH_TITLE, SEARCH_TAG, *RECS)  # tasks and the search split
# The model without the exact-title rule of app.core.ranking.ranking_key: what it learned alone.
MODEL_ONLY = tuple(f"model only ({level})" for level in LEVELS)
# beside the unified levels in the search checks
SEARCH_REFERENCES = (*MODEL_ONLY, "bm25", *LAMBDAMART)
TASTE_REFERENCES = ("popularity", "matrix factorisation", *LAMBDAMART)
GUARD_PAIRS = 300
CHECK_TITLES = 300
TASTE_MEMBERS = 100
_SEED_TAG = " @s"


def _tagged(system: System, seed: int) -> System:
    return System(f"{system.name}{_SEED_TAG}{seed}", system.level, system.score, system.tasks)


def _for_seed(by_system: dict[str, Any], seed: int) -> dict[str, Any]:
    """The entries of one seed's systems (tag removed) and of the untagged shared ones."""
    suffix = f"{_SEED_TAG}{seed}"
    out: dict[str, Any] = {}
    for name, value in by_system.items():
        if name.endswith(suffix):
            out[name.removesuffix(suffix)] = value
        elif _SEED_TAG not in name:
            out[name] = value
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_evaluation(
    source: str,
    path: Path | None,
    seeds: list[int],
    out_dir: Path,
    per_task: int = 500,
    epochs: int = 4,
    *,
    world: object | None = None,
    check_titles: int = CHECK_TITLES,
    guard_pairs: int = GUARD_PAIRS,
    taste_members: int = TASTE_MEMBERS,
    lambdamart: LambdaMARTConfig | None = None,
    train_config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Train, evaluate and check every system; write the JSON and re-render the markdown.
    ``world`` (a synthetic ``WorldConfig``), ``train_config`` (its ``seed`` and ``epochs``
    are replaced per seed) and the check sizes are for small runs and tests."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    config = PipelineConfig(seed=7)
    catalogue, log = load_source(source, path, config.seed, world)
    prep = prepare(catalogue, log, config)
    builder, retriever = prep.builder(serving=True), prep.retriever()
    imps = test_impressions(prep.test, builder, per_task, config.seed)
    rows = training_rows(prep)
    timings["prepare"] = time.perf_counter() - started

    t = time.perf_counter()
    lm = train_lambdamart(rows, lambdamart or LambdaMARTConfig(seed=config.seed))
    timings["lambdamart"] = time.perf_counter() - t
    print(f"lambdamart trained in {lm.stats['train_seconds']:.1f}s", flush=True)
    shared = baseline_systems() + lm.systems((Personalization.NONE, Personalization.FULL))

    t = time.perf_counter()
    seeded: list[System] = []
    trained: list[dict[str, Any]] = []
    for seed in seeds:
        tc = replace(train_config or TrainConfig(), epochs=epochs, seed=seed)
        unified, stats = train_unicorn(prep, rows, tc, desc=f"unified s{seed}")
        systems = model_systems(unified)
        systems += [
            System(s.name, s.level, s.score, ("search",))
            for s in model_systems(unified, prefix="model only", rules=False)
        ]
        per_task_stats: dict[str, float] = {}
        for task in TASKS:
            task_rows = rows.select(rows.task == task)
            model, st = train_unicorn(prep, task_rows, tc, desc=f"{task} s{seed}")
            per_task_stats[task] = st["train_seconds"]
            full = model_systems(model)[2]
            systems.append(System(f"per-task (full) {task}", full.level, full.score, (task,)))
        seeded += [_tagged(s, seed) for s in systems]
        trained.append({"train": stats, "per_task_train_seconds": per_task_stats})
        print(f"seed {seed} trained", flush=True)
    timings["train"] = time.perf_counter() - t

    # Every system at once: retrieval and featurisation are shared by all seeds.
    everything = seeded + shared
    t = time.perf_counter()
    results = evaluate_systems(
        everything, imps, builder, retriever, config.max_retrieved, split_search=True
    )
    timings["evaluate"] = time.perf_counter() - t

    def pick(names: tuple[str, ...]) -> list[System]:
        return [s for s in everything if s.name.split(_SEED_TAG)[0] in names]

    t = time.perf_counter()
    search = pick(UNIFIED + SEARCH_REFERENCES)
    guards = relevance_guards(
        prep.test, builder, retriever, search, guard_pairs, config.max_retrieved, config.seed
    )
    typos = typo_check(
        prep.test, builder, retriever, search, config.max_retrieved, config.seed, check_titles
    )
    prefixes = prefix_check(
        prep.test, builder, retriever, search, config.max_retrieved, config.seed, check_titles
    )
    taste = taste_check(
        prep.train,
        prep.test,
        builder,
        retriever,
        pick(UNIFIED + TASTE_REFERENCES),
        config.max_retrieved,
        config.seed,
        max_members=taste_members,
    )
    timings["checks"] = time.perf_counter() - t
    print(f"checks done in {timings['checks']:.1f}s", flush=True)

    per_seed = [
        {
            "seed": seed,
            "results": _for_seed(results, seed),
            "relevance_guard": _for_seed(guards, seed),
            "typo_check": _for_seed(typos["systems"], seed),
            "prefix_check": _for_seed(prefixes["systems"], seed),
            "taste_check": _for_seed(taste["systems"], seed),
            **train_info,
        }
        for seed, train_info in zip(seeds, trained, strict=True)
    ]
    report = {
        "source": source,
        "command": f"unicorn evaluate --source {source}"
        + (f" --path {path}" if path else "")
        + f" --seeds {' '.join(map(str, seeds))} --per-task {per_task}"
        + f" --epochs {epochs}",
        "data": {
            "rows": len(log),
            "rows_per_task": log.rows_per_task(),
            "train_rows": len(prep.train),
            "fit_rows": len(prep.fit),
            "test_rows": len(prep.test),
            "entities": len(catalogue),
            "training_rows": len(rows),
            "training_impressions_dropped": dict(getattr(rows, "dropped", {})),
        },
        "test_impressions": {t: len(v) for t, v in imps.items()},
        "lambdamart": {"config": lm.config.to_dict(), "stats": lm.stats},
        "checks": {
            "relevance_guard": {"pairs": next(iter(guards.values()), {}).get("pairs", 0.0)},
            "typo": {k: v for k, v in typos.items() if k != "systems"},
            "prefix": {k: v for k, v in prefixes.items() if k != "systems"},
            "taste": {k: v for k, v in taste.items() if k != "systems"},
        },
        "per_seed": per_seed,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    report = _json_safe(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"evaluation_{source}.json").write_text(json.dumps(report, indent=1))
    render_markdown(out_dir)
    return report


# ------------------------------------------------------------------------------ render


def _mean_std(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (float("nan"), 0.0)


def _over_seeds(per_seed: list[dict[str, Any]], *path: str) -> tuple[float, float]:
    """Mean and std over seeds of ``seed_entry[path[0]][path[1]]...``; seeds where it is
    missing (or null) are skipped."""
    vals: list[float] = []
    for entry in per_seed:
        value: Any = entry
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            vals.append(float(value))
    return _mean_std(vals)


def _stat(
    per_seed: list[dict[str, Any]], system: str, task: str, metric: str
) -> tuple[float, float]:
    return _over_seeds(per_seed, "results", system, task, metric)


def _fmt(mean_std: tuple[float, float], n_seeds: int, digits: int = 4) -> str:
    mean, std = mean_std
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n_seeds > 1 else f"{mean:.{digits}f}"


def _lift(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f}%" if b > 0 and math.isfinite(a) else "n/a"


def _gap(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)):
        return "n/a"
    return f"{a - b:+.4f} ({_lift(a, b)})"


def _has(per_seed: list[dict[str, Any]], key: str) -> bool:
    return bool(per_seed) and key in per_seed[0]


def _results_has(per_seed: list[dict[str, Any]], system: str, task: str) -> bool:
    return task in per_seed[0]["results"].get(system, {})


def _not_in_run(what: str) -> list[str]:
    return [f"({what}: not in this run's JSON; rerun `unicorn evaluate`.)", ""]


def _goals(ps: list[dict[str, Any]], n: int) -> list[str]:
    lines = [
        "### 1. Goals: unified (`full`) against the best baseline and LambdaMART (NDCG@10)",
        "",
        "The best baseline is the one with the highest mean NDCG@10 on that task (search "
        "title/tag: on that subset). A positive gap means the unified model is ahead.",
        "",
        "| task | n | unified (full) | best baseline | LambdaMART (full) | gap vs baseline "
        "| gap vs LambdaMART |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in ROW_TASKS:
        if not _results_has(ps, "unified (full)", task):
            continue
        u = _stat(ps, "unified (full)", task, "ndcg@10")
        count = int(_stat(ps, "unified (full)", task, "n")[0])
        base = [
            (name, _stat(ps, name, task, "ndcg@10"))
            for name in BASELINE_NAMES
            if _results_has(ps, name, task)
        ]
        best_name, best = max(base, key=lambda b: b[1][0]) if base else ("–", (math.nan, 0.0))
        lm = _stat(ps, "lambdamart (full)", task, "ndcg@10")
        lines.append(
            f"| {task} | {count} | {_fmt(u, n)} | {best_name} {_fmt(best, n)} | {_fmt(lm, n)} "
            f"| {_gap(u[0], best[0])} | {_gap(u[0], lm[0])} |"
        )
    return [*lines, ""]


def _per_task(ps: list[dict[str, Any]], n: int) -> list[str]:
    lines = [
        "### 2. Unified model vs the same architecture trained per task (full personalization)",
        "",
        "| task | metric | unified | per-task | lift |",
        "|---|---|---|---|---|",
    ]
    for task in TASKS:
        for metric in METRICS:
            u = _stat(ps, "unified (full)", task, metric)
            p = _stat(ps, f"per-task (full) {task}", task, metric)
            lines.append(
                f"| {task} | {metric} | {_fmt(u, n)} | {_fmt(p, n)} | {_lift(u[0], p[0])} |"
            )
    return [*lines, ""]


def _levels(ps: list[dict[str, Any]], n: int) -> list[str]:
    lines = [
        "### 3. Personalization levels (one unified model)",
        "",
        "| task | metric | none | cluster | full | full vs none |",
        "|---|---|---|---|---|---|",
    ]
    for task in ROW_TASKS:
        if not _results_has(ps, "unified (full)", task):
            continue
        for metric in METRICS:
            vals = [_stat(ps, name, task, metric) for name in UNIFIED]
            lines.append(
                f"| {task} | {metric} | "
                + " | ".join(_fmt(v, n) for v in vals)
                + f" | {_lift(vals[2][0], vals[0][0])} |"
            )
    for label, tasks in (
        ("search", ("search",)),
        ("recommendations (prequery, more_like_this, entity)", RECS),
    ):
        full = float(np.mean([_stat(ps, "unified (full)", t, "ndcg@10")[0] for t in tasks]))
        none = float(np.mean([_stat(ps, "unified (none)", t, "ndcg@10")[0] for t in tasks]))
        lines.append(
            f"\nNDCG@10 lift, full vs none, {label}: **{_lift(full, none)}** "
            "(paper: +7% search, +10% recommendations)."
        )
    return [*lines, ""]


def _baselines(ps: list[dict[str, Any]], n: int) -> list[str]:
    lines = [
        "### 4. Baselines and LambdaMART (same test impressions, same retrieved candidates)",
        "",
        "Search queries are split by kind: a *title* query is a prefix of a positive's "
        "normalised name from a word boundary, or within a few edits of one (0 below 4 "
        "characters, 1 for 4–7, 2 from 8); every other search query is a *tag* query.",
        "",
        "| task | system | ndcg@10 | recall@10 | mrr | positive retrieved |",
        "|---|---|---|---|---|---|",
    ]
    systems = ["unified (full)", "unified (none)", *BASELINE_NAMES, *LAMBDAMART]
    for task in ROW_TASKS:
        for system in systems:
            if not _results_has(ps, system, task):
                continue
            cells = [_fmt(_stat(ps, system, task, m), n) for m in METRICS]
            cand = _stat(ps, system, task, "candidate_recall")[0]
            lines.append(f"| {task} | {system} | " + " | ".join(cells) + f" | {cand:.3f} |")
    return [*lines, ""]


def _guard(report: dict[str, Any], ps: list[dict[str, Any]], n: int) -> list[str]:
    lines = ["### 5. Relevance guard", ""]
    if "top1_share" in ps[0]["relevance_guard"]:  # a JSON from before the per-level guard
        guards = [s["relevance_guard"]["top1_share"] for s in ps]
        pairs = int(ps[0]["relevance_guard"]["pairs"])
        return [
            *lines,
            f"Search for a title's exact full name, `full` personalization, {pairs} (user, "
            f"title) pairs: the title ranks first in **{np.mean(guards):.1%}** of them "
            f"(per seed: {[round(g, 3) for g in guards]}).",
            "",
        ]
    pairs = int(report.get("checks", {}).get("relevance_guard", {}).get("pairs", 0))
    lines += [
        f"Search for a title's exact display name by a real member of the test log (their "
        f"country, their personalization), {pairs} (member, title) pairs over titles with a "
        "unique normalised name: the share where the title ranks first.",
        "",
        "| system | top-1 share |",
        "|---|---|",
    ]
    for system in (*UNIFIED, *SEARCH_REFERENCES):
        v = _over_seeds(ps, "relevance_guard", system, "top1_share")
        if math.isfinite(v[0]):
            lines.append(f"| {system} | {_fmt(v, n, 3)} |")
    return [*lines, ""]


def _typos(report: dict[str, Any], ps: list[dict[str, Any]], n: int) -> list[str]:
    lines = ["### 6. Typo check", ""]
    if not _has(ps, "typo_check"):
        return lines + _not_in_run("typo check")
    info = report.get("checks", {}).get("typo", {})
    examples = info.get("examples", {})
    shown = "; ".join(
        f"{kind}: {pairs[0][0]!r} → {pairs[0][1]!r}" for kind, pairs in examples.items() if pairs
    )
    lines += [
        f"The {info.get('titles', '?')} most popular titles (train-split positives) with a "
        "unique normalised name, each searched by its whole name with one seeded typing "
        f"error in one word of at least 4 letters, one query per kind "
        f"({info.get('queries', '?')} queries), each asked by a real member of the test log. "
        f"Examples: {shown}.",
        "",
        "| system | share | " + " | ".join(TYPO_KINDS) + " | overall |",
        "|---|---|" + "---|" * (len(TYPO_KINDS) + 1),
    ]
    for system in (*UNIFIED, *SEARCH_REFERENCES):
        if system not in ps[0]["typo_check"]:
            continue
        for metric in ("top1", "top3"):
            cells = [
                _fmt(
                    _over_seeds(ps, "typo_check", system, g, metric),
                    n,
                    3,
                )
                for g in (*TYPO_KINDS, "overall")
            ]
            lines.append(f"| {system} | {metric} | " + " | ".join(cells) + " |")
    first: dict[str, Any] = next(iter(ps[0]["typo_check"].values()), {})
    retrieved = ", ".join(
        f"{g} {first[g]['retrieved']:.3f}"
        for g in (*TYPO_KINDS, "overall")
        if g in first and first[g].get("retrieved") is not None
    )
    lines += ["", f"Title among the retrieved candidates: {retrieved}.", ""]
    return lines


def _prefixes(report: dict[str, Any], ps: list[dict[str, Any]], n: int) -> list[str]:
    lines = ["### 7. Prefix check", ""]
    if not _has(ps, "prefix_check"):
        return lines + _not_in_run("prefix check")
    titles = report.get("checks", {}).get("prefix", {}).get("titles", "?")
    first: dict[str, Any] = next(iter(ps[0]["prefix_check"].values()), {})
    lengths = [str(x) for x in PREFIX_LENGTHS if str(x) in first]
    lines += [
        f"The same {titles} popular titles, searched by the first 3, 4 and 5 characters of "
        "their normalised name (names no longer than the prefix are left out). Many titles "
        "share a prefix with more popular ones, so 1.0 is out of reach for any ranker; "
        "compare the rows. `bm25` is BM25 with popularity as the tie-break.",
        "",
        "| system | share | " + " | ".join(f"{x} chars" for x in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for system in (*UNIFIED, *SEARCH_REFERENCES):
        if system not in ps[0]["prefix_check"]:
            continue
        for metric in ("top3", "top10"):
            cells = [
                _fmt(
                    _over_seeds(ps, "prefix_check", system, x, metric),
                    n,
                    3,
                )
                for x in lengths
            ]
            lines.append(f"| {system} | {metric} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{x} chars n={int(first[x]['n'])}" for x in lengths)
    retrieved = ", ".join(
        f"{x} chars {first[x]['retrieved']:.3f}"
        for x in lengths
        if first[x].get("retrieved") is not None
    )
    lines += ["", f"Queries: {counts}. Title retrieved: {retrieved}.", ""]
    return lines


def _taste(report: dict[str, Any], ps: list[dict[str, Any]], n: int) -> list[str]:
    lines = ["### 8. Taste check", ""]
    if not _has(ps, "taste_check"):
        return lines + _not_in_run("taste check")
    info = report.get("checks", {}).get("taste", {})
    th = info.get("thresholds", {})
    k = th.get("k", 20)
    key = f"genre_share@{k}"

    def share(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float | int) else "–"

    lines += [
        "Members with a clear favourite genre: at least "
        f"{th.get('min_positives')} train-split positives, and the genre carried by most "
        f"of them is carried by >= {th.get('min_share')} of them and by >= "
        f"{th.get('min_lift')}x the share of all positives carrying it. "
        f"{info.get('qualifying')} members qualify; {info.get('members')} (a seeded sample) "
        "each get a prequery request from their usual country. Reported: the share of the "
        f"top {k} carrying the member's favourite genre. For reference, the genre is carried "
        f"by {share(info.get('mean_train_share'))} of these members' positives and by "
        f"{share(info.get('mean_base_share'))} of all positives (means over members). "
        f"Favourite genres: {info.get('genres')}.",
        "",
        f"| system | favourite-genre share of the top {k} |",
        "|---|---|",
    ]
    for system in (*UNIFIED, *TASTE_REFERENCES):
        v = _over_seeds(ps, "taste_check", system, key)
        if math.isfinite(v[0]):
            lines.append(f"| {system} | {_fmt(v, n, 3)} |")
    return [*lines, ""]


def _cost(report: dict[str, Any], ps: list[dict[str, Any]]) -> list[str]:
    lines = [
        "### 9. Cost",
        "",
        "| seed | unified train s | rows | parameters | per-task train s (sum) |",
        "|---|---|---|---|---|",
    ]
    for s in ps:
        t = s["train"]
        lines.append(
            f"| {s['seed']} | {t['train_seconds']:.1f} | {int(t['rows'])} | "
            f"{int(t['parameters'])} | {sum(s['per_task_train_seconds'].values()):.1f} |"
        )
    lm = report.get("lambdamart")
    if lm:
        st, cfg = lm["stats"], lm["config"]
        lines += [
            "",
            f"LambdaMART: {int(st['trees'])} trees (lr {cfg['learning_rate']}, "
            f"{cfg['num_leaves']} leaves, min {cfg['min_child_samples']} rows per leaf, "
            f"NDCG truncation {cfg['truncation_level']}, {cfg['threads']} thread) on "
            f"{int(st['rows'])} rows of {int(st['impressions'])} impressions with a positive, "
            f"in {st['train_seconds']:.1f} s. Top features by gain: "
            f"{st.get('top_features_by_gain')}.",
        ]
    if "timings" in report:
        lines += ["", f"Wall time by phase (s): {report['timings']}."]
    return [*lines, ""]


def render_source(report: dict[str, Any]) -> list[str]:
    ps = report["per_seed"]
    n = len(ps)
    lines = [
        f"## {report['source']}",
        "",
        f"Command: `{report['command']}` ({report['seconds']} s on this machine).",
        "",
        f"Data: {report['data']}. Test impressions per task: {report['test_impressions']}.",
        f"Seeds: {[s['seed'] for s in ps]}" + (" (mean ± std over seeds)." if n > 1 else "."),
        "",
    ]
    lines += _goals(ps, n)
    lines += _per_task(ps, n)
    lines += _levels(ps, n)
    lines += _baselines(ps, n)
    lines += _guard(report, ps, n)
    lines += _typos(report, ps, n)
    lines += _prefixes(report, ps, n)
    lines += _taste(report, ps, n)
    lines += _cost(report, ps)
    return lines


def render_markdown(out_dir: Path) -> None:
    """Rewrite EVALUATION.md from every evaluation_<source>.json in ``out_dir``, keeping the
    hand-written findings section (between the markers) as it is."""
    path = out_dir / "EVALUATION.md"
    marker_start, marker_end = "<!-- findings -->", "<!-- /findings -->"
    findings = f"{marker_start}\n(Findings are written by hand after a run.)\n{marker_end}"
    if path.exists():
        text = path.read_text()
        if marker_start in text and marker_end in text:
            findings = text[text.index(marker_start) : text.index(marker_end) + len(marker_end)]
    lines = [
        "# Offline evaluation",
        "",
        "Protocol: temporal split per user (each user's last 20% of impressions are the "
        "test set); the training split is cut per user into a history window (the first "
        "half: feature tables, pre-trained item vectors, clusters) and a fit window (ranker "
        "training rows, on the retriever's candidates). "
        "Every metric is computed over the candidates the service's retriever returns (300); "
        "a positive that retrieval misses counts as a miss. Generated by "
        "`model_export/report.py`; regenerate with the commands below.",
        "",
        findings,
        "",
    ]
    for source in ("synthetic", "movielens"):
        f = out_dir / f"evaluation_{source}.json"
        if f.exists():
            lines += render_source(json.loads(f.read_text()))
    path.write_text("\n".join(lines))
