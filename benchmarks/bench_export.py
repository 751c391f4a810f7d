"""Export and latency benchmarks.

1. Latency follows MACs when widths are hardware-friendly: mobilenet_v2 at 224, full and
   pruned (uniform, L1) to 75/50/30% of its MACs with divisor 8 and divisor 1, exported to
   ONNX and TFLite and timed with ONNX Runtime and LiteRT at 1 and 2 threads.
   Target: with divisor 8, latency ratio <= 1.15x the MAC ratio.
2. Parity of every zoo model exported to float ONNX and TFLite, with export wall time
   (int8: benchmarks/bench_int8.py).
3. Export time: each converter given the net as it is and as `for_capture` hands it over
   (BatchNorms folded, activations out of place), in turns; the two files' ops and outputs
   compared.
"""
from __future__ import annotations

import argparse
import collections
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx as onnx_proto
import torch

from common import write_section
from compress import ChannelSpace, build, config_for_macs
from compress.pruning.prune import prune
from compress.models import ZOO
from compress.export import export_onnx, export_tflite, measure
from compress.export.capture import for_capture
from compress.export.litert import open_interpreter, run_inputs
from compress.export.onnx import session
from compress.export.tflite import convert


def latency_table(args, tmp: Path) -> str:
    base = build("mobilenet_v2").eval()
    x = torch.randn(1, 3, 224, 224)
    variants = [("full", 1.0, None, base)]
    for divisor in (8, 1):
        space = ChannelSpace.from_model(base, x, divisor=divisor)
        for frac in (0.75, 0.5, 0.3):
            config = config_for_macs(space, int(space.macs(space.max()) * frac))
            model = prune(base, config, space)
            model.card = base.card
            variants.append((f"{int(frac * 100)}% MACs, divisor {divisor}", space.macs(config) / space.macs(space.max()),
                             divisor, model))
    files = {}
    for label, _, _, model in variants:  # export everything first, then time in interleaved rounds
        stem = tmp / label.replace("%", "").replace(",", "").replace(" ", "_")
        files[label] = {"onnxruntime": stem.with_suffix(".onnx"), "tflite": stem.with_suffix(".tflite")}
        export_onnx(model, files[label]["onnxruntime"])
        export_tflite(model, files[label]["tflite"])
    keys = [(backend, threads) for backend in ("onnxruntime", "tflite") for threads in (1, 2)]
    medians = {(label, key): [] for label in files for key in keys}
    for _ in range(args.rounds):  # the machine drifts; every round times every cell once
        for label in files:
            for backend, threads in keys:
                medians[(label, (backend, threads))].append(measure(
                    files[label][backend], backend, threads=threads, warmup=args.warmup, runs=args.runs)["median_ms"])
    rows = []
    for label, mac_ratio, divisor, _ in variants:
        cells = []
        for key in keys:
            ms = statistics.median(medians[(label, key)])
            ratio = ms / statistics.median(medians[("full", key)])
            flag = ("" if divisor != 8 else " ok" if ratio <= 1.15 * mac_ratio else " OVER")
            cells.append(f"{ms:.2f} ({ratio:.2f}x){flag}")
        rows.append(f"| {label} | {mac_ratio:.3f} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return "\n".join([
        f"mobilenet_v2, 224x224, batch 1; in ms, the median over {args.rounds} interleaved rounds of each "
        f"round's median of {args.runs} runs (after {args.warmup} warm-up), and "
        "the ratio to the full model on the same runtime and threads. 'ok' marks divisor-8 cells within "
        "1.15x the MAC ratio (the target), 'OVER' those beyond it.", "",
        "| model | MAC ratio | ORT 1 thread | ORT 2 threads | LiteRT 1 thread | LiteRT 2 threads |",
        "|---|---|---|---|---|---|", *rows])


def realistic(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """No pretrained weights here, and a random-init model's activations shrink layer by
    layer to ~1e-20, where a logit difference means nothing: measure BN statistics on
    random images and spread the head's weights, so logits are of order 1-10."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, size, size))
    [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].weight.data.normal_(0, 0.5)
    return model.eval()


def parity_table(args, tmp: Path) -> str:
    rows = []
    for name, entry in ZOO.items():
        if entry.task != "classify":  # realistic() spreads a classifier head
            continue
        model = realistic(build(name), entry.input_size)
        began = time.perf_counter()
        onnx = export_onnx(model, tmp / "p.onnx")
        t_onnx = time.perf_counter() - began
        began = time.perf_counter()
        tfl = export_tflite(model, tmp / "p.tflite")
        t_tfl = time.perf_counter() - began
        rows.append(f"| {name} | {entry.input_size} | float | {onnx['parity']['max_abs_logit']:.1f} | "
                    f"{onnx['parity']['max_abs_diff']:.2e} | "
                    f"{tfl['parity']['max_abs_diff']:.2e} | {tfl['parity']['top1_agreement']:.0%} | "
                    f"{t_onnx:.1f} / {t_tfl:.1f} |")
        print(rows[-1], flush=True)
    return "\n".join([
        "Float: random-init zoo models (no pretrained weights here) with BN statistics measured on "
        "random images and the head drawn from N(0, 0.5), so logits have a real size (column 'max "
        "|logit|'); max |logit difference| against PyTorch on 8 random images. int8 files have their own "
        "table (benchmarks/bench_int8.py). Export time is wall-clock seconds (ONNX / TFLite).", "",
        "| model | input | kind | max abs logit | ONNX max diff | TFLite max diff | TFLite top-1 agreement | export s |",
        "|---|---|---|---|---|---|---|---|", *rows])


def _write(fmt: str, net: torch.nn.Module, x: torch.Tensor, path: Path) -> float:
    """Seconds the converter takes over `net` as given (ONNX: dynamic batch, as export_onnx writes it)."""
    began = time.perf_counter()
    if fmt == "tflite":
        convert(net, (x,)).export(str(path))
    else:
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(net, (x.expand(2, -1, -1, -1).contiguous(),), str(path), dynamo=True, opset_version=18,
                          input_names=["input"], dynamic_shapes=({0: batch},), verbose=False)
    return time.perf_counter() - began


def _ops_and_outputs(fmt: str, path: Path, x: np.ndarray) -> tuple[collections.Counter, np.ndarray]:
    if fmt == "tflite":
        return (collections.Counter(d["op_name"] for d in open_interpreter(path)._get_ops_details()),
                run_inputs(path, x))
    return (collections.Counter(n.op_type for n in onnx_proto.load(str(path)).graph.node),
            session(path).run(None, {"input": x})[0])


def capture_table(args, tmp: Path) -> str:
    rows = []
    for name in args.capture_models.split(","):
        model = realistic(build(name), 224)
        x = torch.randn(1, 3, 224, 224)
        for fmt in ("onnx", "tflite"):
            times = {"given": [], "capture": []}
            for _ in range(args.capture_rounds):
                for side in times:
                    net = copy.deepcopy(model).eval() if side == "given" else for_capture(model)
                    times[side].append(_write(fmt, net, x, tmp / f"{side}.{fmt}"))
            (ops, out), (ops2, out2) = (_ops_and_outputs(fmt, tmp / f"{side}.{fmt}", x.numpy()) for side in times)
            given, capture = statistics.median(times["given"]), statistics.median(times["capture"])
            rows.append(f"| {name} | {fmt} | {given:.1f} | {capture:.1f} | {capture / given:.2f} | "
                        f"{'yes' if ops == ops2 else 'no'} ({sum(ops.values())} / {sum(ops2.values())}) | "
                        f"{np.abs(out - out2).max():.1e} |")
            print(rows[-1], flush=True)
    return "\n".join([
        f"Each converter (torch.onnx's dynamo exporter with a dynamic batch; litert-torch) over a 224-px net with "
        f"measured BN statistics, given the net as it is and as `compress.export.capture.for_capture` hands it "
        f"over, the two in turns, {args.capture_rounds} rounds; seconds are medians on this machine, the ratio "
        f"is the one to read. Same ops: the two files' op types and counts (ops as given / as captured); the "
        f"outputs' largest difference on one random image.", "",
        "| model | file | as given (s) | folded, out of place (s) | ratio | same ops | max output diff |",
        "|---|---|---|---|---|---|---|", *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all models")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma list of tables to skip: latency,parity,capture")
    ap.add_argument("--capture-models", default="mobilenet_v2,mobilenet_v3_large,torchvision:resnet50,"
                    "torchvision:efficientnet_b0", help="models of the export-time table")
    ap.add_argument("--capture-rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if "latency" not in args.skip:
            write_section("Latency follows MACs (divisor 8 vs 1)", latency_table(args, Path(tmp)))
        if "parity" not in args.skip:
            write_section("Export parity", parity_table(args, Path(tmp)))
        if "capture" not in args.skip:
            write_section("Export time", capture_table(args, Path(tmp)))


if __name__ == "__main__":
    main()
