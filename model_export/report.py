"""``unicorn evaluate``: the paper's comparisons on one split, written to
``docs/evaluation_<source>.json`` and rendered with the other source's results into
``docs/EVALUATION.md``.

Per seed: the unified model (one model, three personalization levels), the same
architecture trained per task on that task's rows only, and the baselines, all on the same
test impressions and the same retrieved candidates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.engagement_log import TASKS
from model_export.bundle_builder import baseline_systems, model_systems
from model_export.evaluate import System, evaluate_systems, relevance_guard, test_impressions
from model_export.pipeline import PipelineConfig, load_source, prepare, train_unicorn, training_rows
from model_export.train import TrainConfig

METRICS = ("ndcg@10", "recall@10", "mrr")
RECS = ("prequery", "more_like_this", "entity")


def run_evaluation(
    source: str,
    path: Path | None,
    seeds: list[int],
    out_dir: Path,
    per_task: int = 500,
    epochs: int = 4,
) -> dict[str, Any]:
    started = time.perf_counter()
    config = PipelineConfig(seed=7)
    catalogue, log = load_source(source, path, config.seed)
    prep = prepare(catalogue, log, config)
    builder, retriever = prep.builder(serving=True), prep.retriever()
    imps = test_impressions(prep.test, builder, per_task, config.seed)
    rows = training_rows(prep)
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        tc = TrainConfig(epochs=epochs, seed=seed)
        unified, stats = train_unicorn(prep, rows, tc, desc=f"unified s{seed}")
        systems = model_systems(unified)
        per_task_stats: dict[str, float] = {}
        for task in TASKS:
            task_rows = rows.select(rows.task == task)
            model, st = train_unicorn(prep, task_rows, tc, desc=f"{task} s{seed}")
            per_task_stats[task] = st["train_seconds"]
            systems.append(
                System(
                    f"per-task (full) {task}",
                    model_systems(model)[2].level,
                    model_systems(model)[2].score,
                    (task,),
                )
            )
        systems += baseline_systems()
        results = evaluate_systems(systems, imps, builder, retriever, config.max_retrieved)
        guard = relevance_guard(
            prep.test,
            builder,
            retriever,
            systems[2].score,
            300,
            config.max_retrieved,
            seed,
        )
        per_seed.append(
            {
                "seed": seed,
                "results": results,
                "relevance_guard": guard,
                "train": stats,
                "per_task_train_seconds": per_task_stats,
            }
        )
        print(f"seed {seed} done", flush=True)
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
        },
        "test_impressions": {t: len(v) for t, v in imps.items()},
        "per_seed": per_seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"evaluation_{source}.json").write_text(json.dumps(report, indent=1))
    render_markdown(out_dir)
    return report


def _stat(
    per_seed: list[dict[str, Any]], system: str, task: str, metric: str
) -> tuple[float, float]:
    vals = [
        s["results"][system][task][metric] for s in per_seed if task in s["results"].get(system, {})
    ]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (float("nan"), 0.0)


def _fmt(mean_std: tuple[float, float], n_seeds: int) -> str:
    mean, std = mean_std
    return f"{mean:.4f} ± {std:.4f}" if n_seeds > 1 else f"{mean:.4f}"


def _lift(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f}%" if b > 0 else "n/a"


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
        "### 1. Unified model vs the same architecture trained per task (full personalization)",
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
    lines += [
        "",
        "### 2. Personalization levels (one unified model)",
        "",
        "| task | metric | none | cluster | full | full vs none |",
        "|---|---|---|---|---|---|",
    ]
    for task in TASKS:
        for metric in METRICS:
            vals = [
                _stat(ps, f"unified ({lvl})", task, metric) for lvl in ("none", "cluster", "full")
            ]
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
    lines += [
        "",
        "### 3. Baselines (same test impressions, same retrieved candidates)",
        "",
        "| task | system | ndcg@10 | recall@10 | mrr | positive retrieved |",
        "|---|---|---|---|---|---|",
    ]
    systems = ["unified (full)", "popularity", "bm25", "co-occurrence", "matrix factorisation"]
    for task in TASKS:
        for system in systems:
            if task not in ps[0]["results"].get(system, {}):
                continue
            cells = [_fmt(_stat(ps, system, task, m), n) for m in METRICS]
            cand = _stat(ps, system, task, "candidate_recall")[0]
            lines.append(f"| {task} | {system} | " + " | ".join(cells) + f" | {cand:.3f} |")
    guards = [s["relevance_guard"]["top1_share"] for s in ps]
    pairs = int(ps[0]["relevance_guard"]["pairs"])
    lines += [
        "",
        "### 4. Relevance guard",
        "",
        f"Search for a title's exact full name, `full` personalization, {pairs} (user, title) "
        f"pairs: the title ranks first in **{np.mean(guards):.1%}** of them "
        f"(per seed: {[round(g, 3) for g in guards]}).",
        "",
        "### 5. Cost",
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
    return [*lines, ""]


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
        "Protocol (DESIGN.md): temporal split per user (each user's last 20% of impressions "
        "are the test set); the training split is cut by time into a history window (feature "
        "tables, pre-trained item vectors, clusters) and a fit window (ranker training rows). "
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
