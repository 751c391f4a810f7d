"""report.md of a recipe run: one table per target (MACs, params, accuracy before and after
fine-tuning, export parity, measured latency against the budget, pass/fail) and plots."""
from __future__ import annotations

import datetime
from pathlib import Path

import torch

from compress.app.results import UNPRUNED, Exported, ExportedFile, Finetuned, Nets, Timed, Timing
from compress.app.run_context import RunContext
from compress.files import atomic_write_bytes, atomic_write_figure, atomic_write_text
from compress.units import format_score, human

def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _metric(tuned: Finetuned) -> tuple[str, str]:
    """The test metric's key and name: recall@1 for embeddings (before their mAP), PSNR for
    restoration, mIoU for segmentation, mAP for detection, top-1."""
    test = next(iter(tuned.nets.values())).test_after if tuned.nets else {}
    return next(((key, name) for key, name in (("recall1", "recall@1"), ("psnr", "PSNR"), ("miou", "mIoU"),
                                               ("map", "mAP")) if key in test), ("top1", "top-1"))


def _fidelity(test: dict) -> str:
    key = next((k for k in ("fidelity_miou", "fidelity_map", "fidelity_top1", "fidelity_recall1", "fidelity_psnr")
                if test.get(k) is not None), None)
    return "-" if key is None else format_score(key, test[key])


NOTES = {  # what the fidelity column means, per metric
    "miou": "Fidelity: the mIoU of the pruned net's pixels taking the unpruned net's predictions as the truth (no "
            "labels needed), after fine-tuning.",
    "map": "Fidelity: the mAP of the pruned net's detections taking the unpruned net's detections scoring at least "
           "0.5 as the truth (no labels needed), after fine-tuning. The exported files hold the network up to its raw "
           "head outputs (class logits and box regressions per anchor or point); decoding the boxes and NMS run "
           "outside them, as `RawDetector.detections` does.",
    "top1": "Fidelity: the share of test images on which the pruned net's top-1 is the unpruned net's, after "
            "fine-tuning.",
    "psnr": "Fidelity: the PSNR of the pruned net's output images against the unpruned net's (no targets needed), "
            "after fine-tuning.",
    "recall1": "Fidelity: the share of test images whose nearest other image by the pruned net's embedding is the "
               "unpruned net's nearest, after fine-tuning (the mean cosine similarity to the unpruned net's embeddings "
               "is in the stage's results).",
}


def write_report(ctx: RunContext) -> list[str]:
    """Write report.md (+ report.png) into the run folder, print the tables; returns the
    failed checks."""
    r, run_dir = ctx.recipe, ctx.dir
    nets: Nets = ctx.results["prune" if "prune" in ctx.results else "extract"]
    tuned: Finetuned = ctx.results["finetune"]
    exported: Exported = ctx.results["export"]
    timed: Timed = ctx.results["latency"]
    files, failures, baseline = _unpruned_files(exported, timed)
    score, metric = _metric(tuned)
    rows, points, notes = [], [], []
    for target in r.targets():
        tag = target.tag()
        row, point, note, target_files, problems = _target(tag, nets, tuned, exported, timed, score, metric)
        rows.append(row)
        points.append(point)
        notes += [note] if note else []
        files += target_files
        failures += problems
    table = [f"| target | MACs | params | held-out top-1 (search) | test {metric} before fine-tune | after "
             f"| fidelity to unpruned | vs unpruned | result |", "|---|---|---|---|---|---|---|---|---|", *rows]
    if notes:
        table += ["", "Fine-tuning kept its best state on held-out training images (never worse than the pruned "
                  "net there): " + "; ".join(notes) + "."]
    if nets.unpruned:
        u = nets.unpruned
        table.insert(2, f"| unpruned | {human(u.macs)} | {human(u.params)} | - | {format_score(score, u.test[score])} "
                        "| - | - | 100% MACs | - |")
    cuts = [net.latency for net in nets.nets.values() if net.latency]
    if cuts:
        table += ["", f"Latency targets, as the prune stage measured its cut on {cuts[0]['clock']}: " + "; ".join(
            f"{net.label}: {t['measured_ms']:.3f} ms measured, {t['predicted_ms']:.3f} ms predicted, budget "
            f"{t['budget_ms']:.3f} ms, after {len(t['attempts'])} cut(s)" for net in nets.nets.values()
            if (t := net.latency)) + "."]
    table += ["", NOTES[score]]
    file_table = ["| target | file | size (x float) | parity with PyTorch | top-1 float / file | latency ms "
                  "(x float, x unpruned) | result |", "|---|---|---|---|---|---|---|", *files]
    file_table += ["", *[f"The unpruned model's quantized file is a baseline, not a target of the recipe: {p}"
                         for p in baseline]] if baseline else []
    lines = [*_header(ctx), "", *table, "", "Exported files: float, and quantized beside it when the recipe asks; "
             "parity is the largest logit difference for float files and, for quantized ones, the agreement with the "
             "float model the task's gate reads (top-1; mIoU, mAP@50, mean cosine or SSIM), on the evaluation images; "
             "latency is the median on the recipe's runtime and threads, the files timed in turns here (so their "
             "ratios compare one machine) and one after the other on a phone.", "", *file_table, "",
             *_search_lines(ctx)]
    _plot(run_dir / "report.png", points, metric, score)
    lines += [f"![test {metric} vs MACs before and after fine-tuning](report.png)", "",
              "## Commands", "", "The stages, as the equivalent `chansearch` commands:", "", "```",
              *ctx.commands, "```", ""]
    if failures:
        lines += ["## Failed checks", "", *[f"- {f}" for f in failures], ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    print("\n".join(table + [""] + file_table))
    print(f"report: {run_dir / 'report.md'}")
    return failures


def _header(ctx: RunContext) -> list[str]:
    r = ctx.recipe
    path = "direct pruning" if r.supernet.method == "none" else f"{r.supernet.method} supernet + {r.search.method} search"
    return [f"# {r.name}", "", f"Run folder: `{ctx.dir}`  ", f"Finished: {datetime.datetime.now():%Y-%m-%d %H:%M}  ",
            f"Model: {r.model.name}" + (" (transferred to the data first: `transfer/model.pt`)" if r.transfer else "")
            + f"; data: `{r.data.spec}`; path: {path}"]


def _unpruned_files(exported: Exported, timed: Timed) -> tuple[list[str], list[str], list[str]]:
    """The unpruned model's file rows, the failed checks of its float files, and the notes on its
    quantized ones (the quantized model the user brought: a baseline to compare with, not a target)."""
    rows, failures, baseline = [], [], []
    for item in (f for f in exported.files if f.tag == UNPRUNED):
        row, problems = _file_row(UNPRUNED, item, timed.of(UNPRUNED, item.variant), timed.of(UNPRUNED, item.fmt), None)
        rows.append(row)
        (baseline if item.variant != item.fmt else failures).extend(problems)
    return rows, failures, baseline


def _target(tag: str, nets: Nets, tuned: Finetuned, exported: Exported, timed: Timed, score: str, metric: str):
    """One target's row, its plot point, its keep_best note, its file rows and its failed checks."""
    net, done = nets.nets[tag], tuned.nets[tag]
    record = torch.load(done.path, map_location="cpu", weights_only=True)
    rows, failures = [], []
    speedup = None  # latency against the unpruned model's, the first format's float files
    for item in (f for f in exported.files if f.tag == tag):
        base = timed.of(UNPRUNED, item.fmt)  # the speed-up a pruned file gives, like for like
        timing = timed.of(tag, item.variant)
        row, problems = _file_row(net.label, item, timing, timed.of(tag, item.fmt),
                                  timed.of(UNPRUNED, item.variant) or base)
        if speedup is None and item.variant == item.fmt and base and timing:
            speedup = timing.median_ms / base.median_ms
        rows.append(row)
        failures += problems
    before, after = done.test_before[score], done.test_after[score]
    u = nets.unpruned
    versus = "-" if not u else (f"{record['macs'] / u.macs:.0%} MACs, " + (f"{speedup:.2f}x latency, " if speedup else "")
                                + (f"{after - u.test[score]:+.2f} dB" if score == "psnr"
                                   else f"{(after - u.test[score]) * 100:+.1f} points"))
    row = (f"| {net.label} | {human(record['macs'])} | {human(record['params'])} | {_pct(net.heldout_top1)} | "
           f"{format_score(score, before)} | {format_score(score, after)} | {_fidelity(done.test_after)} | {versus} | "
           f"{'FAIL' if failures else 'pass'} |")
    note = None
    if done.kept_best:
        kept = done.kept_best
        where = "at the start of the quantization-aware epochs, int8 net" if kept.get("int8") else "before fine-tuning"
        note = (f"{net.label}: the state after step {kept['step']}, held-out {metric} "
                f"{format_score(score, kept['start']['top1'])} {where} -> {format_score(score, kept['top1'])}")
    return row, (record["macs"], before, after, net.label), note, rows, failures


def _search_lines(ctx: RunContext) -> list[str]:
    lines = []
    if "supernet" in ctx.results:
        summary = ctx.results["supernet"].summary
        lines += ["Supernet (held-out, BN recalibrated): " + ", ".join(
            f"{k} config {human(v['macs'])} MACs top-1 {v['top1']:.2%}" for k, v in summary.items()), ""]
    if "search" in ctx.results:
        plot = Path(ctx.results["search"].plot)
        if plot.exists():
            atomic_write_bytes(ctx.dir / "search.png", plot.read_bytes())
            lines += ["![search: every evaluated config, the Pareto front and the chosen ones](search.png)", ""]
    return lines


def _file_row(label: str, item: ExportedFile, timing: Timing | None, float_timing: Timing | None,
              unpruned_timing: Timing | None) -> tuple[str, list[str]]:
    """One exported file's row and its failed checks."""
    problems = []
    size = "-"
    if item.bytes is not None:
        size = f"{item.bytes / 1e6:.2f} MB" + (f" ({item.bytes / item.float_bytes:.2f}x)" if item.quantize else "")
    p = item.parity
    parity = ("-" if p is None else f"{p.get('agreement_of', 'top-1')} agreement {p['top1_agreement']:.1%}"
              if item.quantize
              else f"max diff {p['max_abs_diff']:.1e}")
    accuracy = (f"{_pct(p['accuracy']['float'])} / {_pct(p['accuracy']['exported'])}"
                if p and "accuracy" in p else "-")
    if not item.ok:
        parity += " FAILED"
        problems.append(f"{label} {item.variant} parity: {item.error[:300]}")
    lat = "-"
    if timing:
        lat = f"{timing.median_ms:.2f}"
        ratios = [f"{timing.median_ms / other.median_ms:.2f}x{suffix}"
                  for other, suffix in ((float_timing, ""), (unpruned_timing, " unpruned"))
                  if other and other is not timing]
        if ratios:
            lat += f" ({', '.join(ratios)})"
        if timing.budget_ms:
            lat += f" / budget {timing.budget_ms:.3g}"
        if not timing.ok:
            problems.append(f"{label} {item.variant} latency {timing.median_ms:.3f} ms over the {timing.budget_ms:.3g} "
                            f"ms budget ({timing.backend}, {timing.threads} thread(s))")
    return (f"| {label} | {Path(item.path).name} | {size} | {parity} | {accuracy} | {lat} | "
            f"{'FAIL' if problems else 'pass'} |"), problems


def _plot(path: Path, points: list, metric: str, score: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scale, unit = (1, "dB") if score == "psnr" else (100, "%")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for macs, before, after, label in points:
        ax.annotate("", xy=(macs / 1e6, scale * after), xytext=(macs / 1e6, scale * before),
                    arrowprops={"arrowstyle": "->", "color": "tab:blue"})
        ax.scatter([macs / 1e6], [scale * after], color="tab:blue", zorder=3)
        ax.scatter([macs / 1e6], [scale * before], color="tab:gray", zorder=3)
        ax.annotate(label, (macs / 1e6, scale * after), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel(f"test {metric} ({unit})")
    ax.set_title("each target: before (gray) and after (blue) fine-tuning")
    ax.grid(alpha=0.3)
    atomic_write_figure(path, fig)
