"""One-shot search over a supernet: evolution, random and greedy strategies under budgets,
with results written as search.json (per target), search.csv (every candidate) and a plot."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compress.training import distributed
from compress.errors import CompressError
from compress.files import atomic_write_figure, atomic_write_json, atomic_write_text
from compress.search.constraints import Budget, budgets_for, parse_budgets, targets_from_lists
from compress.search.evaluator import Evaluator, HeldOut
from compress.search.strategies import evolution, greedy, random_search

METHODS = ("evolution", "random", "greedy")
RESULT_FILE = "search.json"

__all__ = ["Budget", "Evaluator", "HeldOut", "METHODS", "RESULT_FILE", "budgets_for", "parse_budgets", "pareto_front",
           "plain_entry", "run_search", "targets_from_lists", "write_results"]


def run_search(evaluator: Evaluator, method: str, budgets: list[Budget], seed: int = 0,
               options: dict | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Search each budget; returns the result record (also what search.json holds)."""
    options = dict(options or {})
    if method not in METHODS:
        raise CompressError(f"unknown search method '{method}'; choose one of {', '.join(METHODS)}.")
    if method == "greedy":
        found, _ = greedy(evaluator, budgets, progress=progress, **options)
        best = [found[b] for b in budgets]
    else:
        best = []
        for i, budget in enumerate(budgets):
            rng = np.random.default_rng([seed, i])
            if method == "evolution":
                ranked = evolution(evaluator, budget, rng, progress=progress, **options)
            else:
                ranked = random_search(evaluator, budget, rng, progress=progress, **options)
            best.append(ranked[0])
    targets = [{"label": b.label(), "budget": b.to_dict(), **plain_entry(e)} for b, e in zip(budgets, best)]
    return {"method": method, "seed": seed, "options": options, "targets": targets,
            "evaluated": len(evaluator.cache), "evaluated_now": evaluator.fresh,
            "full": plain_entry(evaluator.score(evaluator.space.max()))}


def plain_entry(entry: dict) -> dict:
    """A scored candidate as search.json holds it (its config a plain dict)."""
    return {k: (v.to_dict() if k == "config" else v) for k, v in entry.items()}


def pareto_front(entries: list[dict]) -> list[dict]:
    """Candidates no other candidate beats on both MACs (fewer) and top-1 (higher)."""
    front, best = [], -1.0
    for e in sorted(entries, key=lambda e: (e["macs"], -e["top1"])):
        if e["top1"] > best:
            front.append(e)
            best = e["top1"]
    return front


def write_results(out_dir: str | Path, result: dict, evaluator: Evaluator) -> None:
    """search.json, search.csv (every evaluated candidate) and search.png, written atomically."""
    if not distributed.is_main():
        return
    out_dir = Path(out_dir)
    entries = [{"config": c.to_dict(), **s} for c, s in evaluator.cache.items()]
    front = {json.dumps(e["config"], sort_keys=True) for e in pareto_front(entries)}
    chosen = {json.dumps(t["config"], sort_keys=True): t["label"] for t in result["targets"]}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["macs", "params", "latency_ms", "top1", "loss", "pareto", "chosen_for", "config"])
    for e in sorted(entries, key=lambda e: e["macs"]):
        key = json.dumps(e["config"], sort_keys=True)
        writer.writerow([e["macs"], e["params"], e.get("latency_ms", ""), f"{e['top1']:.6f}", f"{e['loss']:.6f}",
                         int(key in front), chosen.get(key, ""), json.dumps(e["config"])])
    atomic_write_text(out_dir / "search.csv", buf.getvalue())
    atomic_write_json(out_dir / RESULT_FILE, result)
    _plot(out_dir / "search.png", entries, pareto_front(entries), result)


def _plot(path: Path, entries: list[dict], front: list[dict], result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([e["macs"] / 1e6 for e in entries], [100 * e["top1"] for e in entries], s=10, alpha=0.4,
               color="tab:gray", label=f"evaluated ({len(entries)})")
    ax.plot([e["macs"] / 1e6 for e in front], [100 * e["top1"] for e in front], "-o", ms=4, color="tab:blue",
            label="Pareto front")
    for t in result["targets"]:
        ax.scatter([t["macs"] / 1e6], [100 * t["top1"]], marker="*", s=160, color="tab:red", zorder=3)
        if t["budget"]["macs"]:
            ax.axvline(t["budget"]["macs"] / 1e6, ls="--", lw=0.8, color="tab:red")
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(f"{result['method']} search: chosen configs (stars) under each MAC budget (dashed)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    atomic_write_figure(path, fig)
