"""Coverage: does every CNN a user brings go through the pipeline?

Each architecture is built from its model source (torchvision:, timm:, a user's file), pruned
to 50% of its MACs (`prune_target(macs="50%", strategy="global")`, weight magnitude: no data
is needed to check the mechanics), and then:

- MACs: the pruned model's thop count over the unpruned one's, and whether the space's
  closed-form count equals thop's exactly;
- forward: the pruned model runs and its outputs (a tensor, a dict or a list of them) are finite;
- recovery step: one SGD step of the task's distillation from the unpruned model's outputs
  (KL on logits, per pixel, per box and the boxes; the embedding's cosine; the image's L1; train
  mode), after which the outputs are still finite;
- ONNX and TFLite: the float file's largest output difference from PyTorch, over the largest
  output (random weights make outputs of any scale);
- latency: the pruned TFLite file's median time over the unpruned one's (LiteRT, 1 thread,
  interleaved rounds).

A cell that fails shows the start of its message: "refused" for a CompressError (the named
reason a user gets), "RAW" for any other exception (a bug). Each architecture's row is stored
under --cells as it finishes, so an interrupted run continues where it stopped.

    python benchmarks/bench_coverage.py --input-size 224
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import write_section
from compress import ChannelSpace, CompressError, build, count
from compress.pruning.prune import prune_target
from compress.export import export_onnx, export_tflite, measure
from compress.pruning.graph import example_input
from compress.training.tasks import task_of

UNET = "benchmarks/unet.py:unet"  # a user's own file: run from the repository root
ESPCN = "benchmarks/espcn.py:espcn"
ARCHS = [  # (source, num_classes[, task]): None keeps the source's own; a task is declared, not read off
    ("torchvision:mobilenet_v2", None), ("torchvision:mobilenet_v3_large", None),
    ("torchvision:mobilenet_v3_small", None), ("torchvision:efficientnet_b0", None), ("torchvision:resnet50", None),
    ("torchvision:resnext50_32x4d", None), ("torchvision:regnet_y_400mf", None), ("torchvision:regnet_x_400mf", None),
    ("torchvision:mnasnet1_0", None), ("torchvision:convnext_tiny", None), ("torchvision:densenet121", None),
    ("torchvision:shufflenet_v2_x1_0", None), ("timm:ghostnet_100", None), ("timm:mobilenetv3_large_100", None),
    ("timm:efficientnet_lite0", None), ("timm:mobilenetv4_conv_small", None), ("timm:repvgg_a0", None),
    ("timm:rexnet_100", None),
    ("torchvision:lraspp_mobilenet_v3_large", None), ("torchvision:deeplabv3_mobilenet_v3_large", None),
    ("torchvision:ssdlite320_mobilenet_v3_large", None), ("torchvision:fcos_resnet50_fpn", None),
    ("torchvision:retinanet_resnet50_fpn_v2", None),
    ("lraspp_mobilenet_v2", 4), ("fcos_mobilenet_v2", 4), (UNET, 2), ("torchvision:mobilenet_v2", 128, "embed"),
    (ESPCN, None, "restore"),
]


def tensors(out) -> list[torch.Tensor]:
    """Every tensor of a model's output: a tensor, or dicts/lists/tuples of them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for item in out for t in tensors(item)] if isinstance(out, (list, tuple)) else []


def failure(exc: BaseException) -> str:
    kind = "refused" if isinstance(exc, CompressError) else f"RAW {type(exc).__name__}"
    return f"{kind}: {' '.join(str(exc).split())[:90]}"


def recovery_step(pruned: torch.nn.Module, teacher: torch.nn.Module, size: int) -> str:
    """One SGD step of the model's task distillation from the unpruned model (what a fine-tune
    with a teacher computes, less the labelled part), then the outputs must stay finite."""
    task = task_of(pruned)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        target = teacher.eval()(x)
    pruned.train()
    opt = torch.optim.SGD(pruned.parameters(), lr=1e-3, momentum=0.9)
    loss = task.distill(pruned(x), target, 4.0)
    loss.backward()
    opt.step()
    pruned.eval()
    with torch.no_grad():
        ok = all(torch.isfinite(t).all() for t in tensors(pruned(x)))
    return "ok" if ok and math.isfinite(loss.item()) else "non-finite"


def row(source: str, classes: int | None, task: str | None, size: int, tmp: Path, rounds: int) -> dict:
    cell = {"source": source + (f" ({task})" if task else "")}  # the row's label
    began = time.perf_counter()
    try:
        model = build(source, num_classes=classes, input_size=size, task=task).eval()
        pruned, info = prune_target(model, macs="50%", strategy="global")
    except Exception as exc:
        return {**cell, "prune": failure(exc)}
    cell["prune_s"] = time.perf_counter() - began
    full, _ = count(model, size)
    macs, _ = count(pruned, size)
    space = ChannelSpace.from_model(model, example_input(size))
    cell.update(macs_before=full, macs=macs, exact=space.macs(pruned.card.config) == macs, held=len(space.held),
                prune="ok")
    try:
        with torch.no_grad():
            outs = tensors(pruned.eval()(example_input(size)))
        cell["forward"] = "ok" if outs and all(torch.isfinite(t).all() for t in outs) else "non-finite"
    except Exception as exc:
        return {**cell, "forward": failure(exc)}
    try:
        cell["recovery"] = recovery_step(pruned, model, size)
    except Exception as exc:
        cell["recovery"] = failure(exc)
    files = {}
    for fmt, export in (("onnx", export_onnx), ("tflite", export_tflite)):
        try:
            report = export(pruned, tmp / f"pruned.{fmt}", tolerance=None)
            parity = report["parity"]  # relative to the outputs' scale: random weights give tiny outputs
            cell[fmt] = f"{parity['max_abs_diff'] / max(parity['max_abs_logit'], 1e-30):.1e}"
            files[fmt] = tmp / f"pruned.{fmt}"
        except Exception as exc:
            cell[fmt] = failure(exc)
    if "tflite" in files:
        try:
            export_tflite(model, tmp / "full.tflite", tolerance=None)
            times = {"full": [], "pruned": []}
            for _ in range(rounds):
                for key, path in (("full", tmp / "full.tflite"), ("pruned", files["tflite"])):
                    times[key].append(measure(path, "tflite", threads=1, warmup=3, runs=10)["median_ms"])
            cell["latency"] = statistics.median(times["pruned"]) / statistics.median(times["full"])
        except Exception as exc:
            cell["latency"] = failure(exc)
    return cell


def table(cells: list[dict], size: int) -> str:
    lines = [f"Every architecture built from its model source, pruned to 50% of its MACs at {size}x{size} "
             "(global, weight magnitude), then run, one distillation step, exported and timed. 'refused' is the "
             "CompressError a user gets (its start); 'RAW' would be an unhandled exception. 'count exact': the "
             "space's closed-form MACs equal thop's count of the pruned model; 'held groups': channel groups kept at "
             "full width because their channels reach a split, chunk or channel slice (GhostNet's sliced ghost "
             "modules). Latency on random weights at batch 1, float files.", "",
             "| model | MACs | pruned (x unpruned) | count exact | held groups | forward | recovery step | "
             "ONNX max diff (x max output) | TFLite max diff (x max output) | TFLite latency (x unpruned) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if c.get("prune") != "ok":
            lines.append(f"| {c['source']} | - | {c['prune']} | - | - | - | - | - | - | - |")
            continue
        latency = c.get("latency", "-")
        latency = f"{latency:.2f}x" if isinstance(latency, float) else latency
        lines.append(f"| {c['source']} | {c['macs_before'] / 1e6:.0f}M | {c['macs'] / c['macs_before']:.3f} | "
                     f"{'yes' if c['exact'] else 'NO'} | {c['held']} | {c.get('forward', '-')} | "
                     f"{c.get('recovery', '-')} | {c.get('onnx', '-')} | {c.get('tflite', '-')} | {latency} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, default=224, help="input height/width for every model")
    ap.add_argument("--only", nargs="*", help="these rows only, by label: the source, with ' (task)' where "
                    "declared (default: all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    ap.add_argument("--cells", default="runs/coverage", help="folder keeping each finished row")
    ap.add_argument("--table-only", action="store_true", help="write the table from the stored rows")
    args = ap.parse_args()
    folder = Path(args.cells) / str(args.input_size)
    folder.mkdir(parents=True, exist_ok=True)
    cells = []
    for source, classes, *declared in ARCHS:
        task = declared[0] if declared else None
        label = source + (f" ({task})" if task else "")
        if args.only and label not in args.only:
            continue
        path = folder / (source.replace(":", "_").replace("/", "_") + (f"_{task}" if task else "") + ".json")
        if not path.exists() and not args.table_only:
            print(f"{source} ...", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                path.write_text(json.dumps(row(source, classes, task, args.input_size, Path(tmp), args.rounds)))
        if path.exists():
            cells.append(json.loads(path.read_text()))
            print(json.dumps(cells[-1]), flush=True)
    title = f"Coverage: architectures through prune, recovery and export ({args.input_size} px)"
    if args.only:  # a re-run of some rows gets a section of its own; the full table stays as it was
        title += f", re-run: {', '.join(args.only)}"
    write_section(title, table(cells, args.input_size))


if __name__ == "__main__":
    sys.exit(main())
