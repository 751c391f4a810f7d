"""report.md of a recipe run: one table per target (MACs, params, accuracy before and after
fine-tuning, export parity, measured latency against the budget, pass/fail) and plots."""
from __future__ import annotations

import datetime
import io
from pathlib import Path

import torch

from compress.files import atomic_write_bytes, atomic_write_text
from compress.units import human


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def write_report(pipeline, nets: dict, tuned: dict, exported: dict, timed: dict) -> list[str]:
    """Write report.md (+ report.png) into the run folder, print the table; returns the
    failed checks."""
    r, run_dir = pipeline.recipe, pipeline.dir
    failures, rows, points = [], [], []
    for target in r.targets():
        tag = target.tag()
        record = torch.load(tuned[tag]["path"], map_location="cpu", weights_only=True)
        cells, ok = [], True
        for fmt in r.export.formats:
            item = exported.get(f"{tag}/{fmt}")
            if item is None:
                cells.append("-")
            elif item["ok"]:
                p = item["parity"]
                cells.append(f"{p['max_abs_diff']:.1e} / {p['top1_agreement']:.0%}")
            else:
                cells.append("FAILED")
                ok = False
                failures.append(f"{tag} {fmt} parity: {item['error'][:200]}")
        lat = []
        for fmt in r.export.formats:
            t = timed.get(f"{tag}/{fmt}")
            if t is None:
                continue
            budget = f" / {t['budget_ms']:g}" if t["budget_ms"] else ""
            lat.append(f"{fmt} {t['median_ms']:.2f}{budget}")
            if not t["ok"]:
                ok = False
                failures.append(f"{tag} {fmt} latency {t['median_ms']:.3f} ms over the {t['budget_ms']:g} ms budget "
                                f"({t['backend']}, {t['threads']} thread(s))")
        before, after = tuned[tag]["test_before"]["top1"], tuned[tag]["test_after"]["top1"]
        rows.append(f"| {nets['nets'][tag]['label']} | {human(record['macs'])} | {human(record['params'])} | "
                    f"{_pct(nets['nets'][tag]['heldout_top1'])} | {_pct(before)} | {_pct(after)} | "
                    + " | ".join(cells) + f" | {'; '.join(lat) or '-'} | {'pass' if ok else 'FAIL'} |")
        points.append((record["macs"], before, after, nets["nets"][tag]["label"]))
    header = ("| target | MACs | params | held-out top-1 (search) | test top-1 before fine-tune | after | "
              + " | ".join(f"{f} max diff / top-1 agreement" for f in r.export.formats)
              + " | latency ms (median / budget) | result |")
    table = [header, "|" + "---|" * (header.count("|") - 1), *rows]
    lines = [f"# {r.name}", "", f"Run folder: `{run_dir}`  ", f"Finished: {datetime.datetime.now():%Y-%m-%d %H:%M}  ",
             f"Model: {r.model.name}; data: `{r.data.spec}`; path: "
             + ("direct pruning" if r.supernet.method == "none" else f"{r.supernet.method} supernet + {r.search.method} search"),
             "", *table, ""]
    if "supernet" in pipeline.records:
        summary = pipeline.records["supernet"]["outputs"]["summary"]
        lines += ["Supernet (held-out, BN recalibrated): " + ", ".join(
            f"{k} config {human(v['macs'])} MACs top-1 {v['top1']:.2%}" for k, v in summary.items()), ""]
    if "search" in pipeline.records:
        plot = Path(pipeline.records["search"]["outputs"]["plot"])
        if plot.exists():
            atomic_write_bytes(run_dir / "search.png", plot.read_bytes())
            lines += ["![search: every evaluated config, the Pareto front and the chosen ones](search.png)", ""]
    _plot(run_dir / "report.png", points)
    lines += ["![test top-1 vs MACs before and after fine-tuning](report.png)", "",
              "## Commands", "", "The stages, as the equivalent `chansearch` commands:", "", "```",
              *pipeline.commands, "```", ""]
    if failures:
        lines += ["## Failed checks", "", *[f"- {f}" for f in failures], ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    print("\n".join(table))
    print(f"report: {run_dir / 'report.md'}")
    return failures


def _plot(path: Path, points: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for macs, before, after, label in points:
        ax.annotate("", xy=(macs / 1e6, 100 * after), xytext=(macs / 1e6, 100 * before),
                    arrowprops={"arrowstyle": "->", "color": "tab:blue"})
        ax.scatter([macs / 1e6], [100 * after], color="tab:blue", zorder=3)
        ax.scatter([macs / 1e6], [100 * before], color="tab:gray", zorder=3)
        ax.annotate(label, (macs / 1e6, 100 * after), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("each target: before (gray) and after (blue) fine-tuning")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
