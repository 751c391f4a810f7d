"""report.md of a recipe run: one table per target (MACs, params, accuracy before and after
fine-tuning, export parity, measured latency against the budget, pass/fail) and plots."""
from __future__ import annotations

import datetime
import io
from pathlib import Path

import torch

from compress.files import atomic_write_bytes, atomic_write_text
from compress.units import human

UNPRUNED = "unpruned"  # the key of the unpruned model's files (the direct path exports it too)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"


def _metric(tuned: dict) -> tuple[str, str]:
    """The test metric's key and name: mIoU for segmentation, mAP for detection, top-1."""
    test = next(iter(tuned.values()), {}).get("test_after", {})
    return next(((key, name) for key, name in (("miou", "mIoU"), ("map", "mAP")) if key in test), ("top1", "top-1"))


def _fidelity(test: dict) -> str:
    value = next((test[k] for k in ("fidelity_miou", "fidelity_map", "fidelity_top1") if test.get(k) is not None), None)
    return "-" if value is None else f"{value:.2%}"


def write_report(pipeline, nets: dict, tuned: dict, exported: dict, timed: dict) -> list[str]:
    """Write report.md (+ report.png) into the run folder, print the tables; returns the
    failed checks."""
    r, run_dir = pipeline.recipe, pipeline.dir
    failures, rows, files, points, notes, baseline = [], [], [], [], [], []
    score, metric = _metric(tuned)
    unpruned = nets.get("unpruned")  # the direct path measures the model it pruned (and times it)
    for key in [k for k in exported if k.split("/")[0] == UNPRUNED]:
        variant = key.split("/")[1]
        row, problems = _file_row(UNPRUNED, variant, exported[key], timed.get(key),
                                  timed.get(f"{UNPRUNED}/{variant.split('-')[0]}"), None)
        files.append(row)
        if "-" in variant:  # the quantized model the user brought: a baseline to compare with, not a target
            baseline += problems
        else:
            failures += problems
    for target in r.targets():
        tag = target.tag()
        record = torch.load(tuned[tag]["path"], map_location="cpu", weights_only=True)
        ok = True
        speedup = None  # latency against the unpruned model's, the first format's float files
        for key in [k for k in exported if k.split("/")[0] == tag]:
            variant = key.split("/", 1)[1]  # onnx, tflite, tflite-int8, ...: the float file is the format's own
            fmt = variant.split("-")[0]
            base = timed.get(f"{UNPRUNED}/{fmt}")  # the speed-up a pruned file gives, like for like
            row, problems = _file_row(nets["nets"][tag]["label"], variant, exported[key], timed.get(key),
                                      timed.get(f"{tag}/{fmt}"), timed.get(f"{UNPRUNED}/{variant}", base))
            if speedup is None and variant == fmt and base and key in timed:
                speedup = timed[key]["median_ms"] / base["median_ms"]
            files.append(row)
            failures += problems
            ok = ok and not problems
        before, after = tuned[tag]["test_before"][score], tuned[tag]["test_after"][score]
        versus = "-" if not unpruned else (f"{record['macs'] / unpruned['macs']:.0%} MACs, "
                                           + (f"{speedup:.2f}x latency, " if speedup else "")
                                           + f"{(after - unpruned['test'][score]) * 100:+.1f} points")
        rows.append(f"| {nets['nets'][tag]['label']} | {human(record['macs'])} | {human(record['params'])} | "
                    f"{_pct(nets['nets'][tag]['heldout_top1'])} | {_pct(before)} | {_pct(after)} | "
                    f"{_fidelity(tuned[tag]['test_after'])} | {versus} | {'pass' if ok else 'FAIL'} |")
        points.append((record["macs"], before, after, nets["nets"][tag]["label"]))
        kept = tuned[tag].get("kept_best")
        if kept:
            where = ("at the start of the quantization-aware epochs, int8 net" if kept.get("int8")
                     else "before fine-tuning")
            notes.append(f"{nets['nets'][tag]['label']}: the state after step {kept['step']}, held-out {metric} "
                         f"{kept['start']['top1']:.2%} {where} -> {kept['top1']:.2%}")
    table = [f"| target | MACs | params | held-out top-1 (search) | test {metric} before fine-tune | after "
             f"| fidelity to unpruned | vs unpruned | result |", "|---|---|---|---|---|---|---|---|---|", *rows]
    if notes:
        table += ["", "Fine-tuning kept its best state on held-out training images (never worse than the pruned "
                  "net there): " + "; ".join(notes) + "."]
    if unpruned:
        table.insert(2, f"| unpruned | {human(unpruned['macs'])} | {human(unpruned['params'])} | - | "
                        f"{_pct(unpruned['test'][score])} | - | - | 100% MACs | - |")
    if score == "miou":
        table += ["", "Fidelity: the mIoU of the pruned net's pixels taking the unpruned net's predictions as the "
                  "truth (no labels needed), after fine-tuning."]
    elif score == "map":
        table += ["", "Fidelity: the mAP of the pruned net's detections taking the unpruned net's detections scoring "
                  "at least 0.5 as the truth (no labels needed), after fine-tuning. The exported files hold the "
                  "network up to its raw head outputs (class logits and box regressions per default box); decoding "
                  "the boxes and NMS run outside them, as `RawSSD.detections` does."]
    else:
        table += ["", "Fidelity: the share of test images on which the pruned net's top-1 is the unpruned net's, "
                  "after fine-tuning."]
    file_table = ["| target | file | size (x float) | parity with PyTorch | top-1 float / file | latency ms "
                  "(x float, x unpruned) | result |", "|---|---|---|---|---|---|---|", *files]
    file_table += ["", *[f"The unpruned model's quantized file is a baseline, not a target of the recipe: {p}"
                         for p in baseline]] if baseline else []
    lines = [f"# {r.name}", "", f"Run folder: `{run_dir}`  ", f"Finished: {datetime.datetime.now():%Y-%m-%d %H:%M}  ",
             f"Model: {r.model.name}" + (" (transferred to the data first: `transfer/model.pt`)" if r.transfer else "")
             + f"; data: `{r.data.spec}`; path: "
             + ("direct pruning" if r.supernet.method == "none" else f"{r.supernet.method} supernet + {r.search.method} search"),
             "", *table, "", "Exported files: float, and quantized beside it when the recipe asks; parity is the "
             "largest logit difference for float files and the top-1 agreement for quantized ones, on the "
             "evaluation images; latency is the median on the recipe's runtime and threads.", "", *file_table, ""]
    if "supernet" in pipeline.records:
        summary = pipeline.records["supernet"]["outputs"]["summary"]
        lines += ["Supernet (held-out, BN recalibrated): " + ", ".join(
            f"{k} config {human(v['macs'])} MACs top-1 {v['top1']:.2%}" for k, v in summary.items()), ""]
    if "search" in pipeline.records:
        plot = Path(pipeline.records["search"]["outputs"]["plot"])
        if plot.exists():
            atomic_write_bytes(run_dir / "search.png", plot.read_bytes())
            lines += ["![search: every evaluated config, the Pareto front and the chosen ones](search.png)", ""]
    _plot(run_dir / "report.png", points, metric)
    lines += [f"![test {metric} vs MACs before and after fine-tuning](report.png)", "",
              "## Commands", "", "The stages, as the equivalent `chansearch` commands:", "", "```",
              *pipeline.commands, "```", ""]
    if failures:
        lines += ["## Failed checks", "", *[f"- {f}" for f in failures], ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    print("\n".join(table + [""] + file_table))
    print(f"report: {run_dir / 'report.md'}")
    return failures


def _file_row(label: str, name: str, item: dict, timing: dict | None, float_timing: dict | None,
              unpruned_timing: dict | None) -> tuple[str, list[str]]:
    """One exported file's row and its failed checks."""
    problems = []
    size = "-"
    if "bytes" in item:
        size = f"{item['bytes'] / 1e6:.2f} MB" + (f" ({item['bytes'] / item['float_bytes']:.2f}x)"
                                                 if item.get("quantize") else "")
    p = item.get("parity")
    parity = ("-" if p is None else f"agreement {p['top1_agreement']:.1%}" if item.get("quantize")
              else f"max diff {p['max_abs_diff']:.1e}")
    accuracy = (f"{_pct(p['accuracy']['float'])} / {_pct(p['accuracy']['exported'])}"
                if p and "accuracy" in p else "-")
    if not item["ok"]:
        parity += " FAILED"
        problems.append(f"{label} {name} parity: {item['error'][:300]}")
    lat = "-"
    if timing:
        lat = f"{timing['median_ms']:.2f}"
        ratios = [f"{timing['median_ms'] / other['median_ms']:.2f}x{suffix}"
                  for other, suffix in ((float_timing, ""), (unpruned_timing, " unpruned"))
                  if other and other is not timing]
        if ratios:
            lat += f" ({', '.join(ratios)})"
        if timing["budget_ms"]:
            lat += f" / budget {timing['budget_ms']:g}"
        if not timing["ok"]:
            problems.append(f"{label} {name} latency {timing['median_ms']:.3f} ms over the {timing['budget_ms']:g} ms "
                            f"budget ({timing['backend']}, {timing['threads']} thread(s))")
    return (f"| {label} | {Path(item['path']).name} | {size} | {parity} | {accuracy} | {lat} | "
            f"{'FAIL' if problems else 'pass'} |"), problems


def _plot(path: Path, points: list, metric: str) -> None:
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
    ax.set_ylabel(f"test {metric} (%)")
    ax.set_title("each target: before (gray) and after (blue) fine-tuning")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
