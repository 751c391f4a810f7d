"""Accuracy of the per-layer latency table (`chansearch lut`) against measured whole models.

Builds the table for a model's channel space on one runtime, then times random configs for
real and reports how many predictions fall within +-10% (nn-Meter's bar is 99% within +-10%
on mobile CPUs). `--size cpu`: mobilenet_v2 at 224, 50 random configs; `quick`: a tiny model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_section

SIZES = {"cpu": dict(model="mobilenet_v2", extra=[], grid=4, anchors=6, check=50, runs=30),
         "gpu": dict(model="mobilenet_v2", extra=[], grid=4, anchors=6, check=50, runs=30),
         "quick": dict(model="mobilenet_v3_small_cifar", extra=["--input-size", "16"], grid=2, anchors=3, check=5,
                       runs=10)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--backends", default="onnxruntime,tflite")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    p = SIZES[args.size]
    rows = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "lut.json"
            cmd = [sys.executable, "-m", "compress", "lut", p["model"], *p["extra"], "--backend", backend,
                   "--threads", str(args.threads), "--grid", str(p["grid"]), "--anchors", str(p["anchors"]),
                   "--check", str(p["check"]), "--runs", str(p["runs"]), "--quiet", "-o", str(out)]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True)
            r = json.loads(out.read_text())
        c = r["check"]
        rows.append(f"| {backend} | {args.threads} | {len(r['layers'])} / {r['unique_layers']} | {r['fit']['a']:.3f} / "
                    f"{r['fit']['b']:.3f} | {c['within_10pct']:.0%} | {c['within_5pct']:.0%} | "
                    f"{c['mean_abs_error_pct']:.1f}% | {c['max_abs_error_pct']:.1f}% |")
    write_section(f"Latency table accuracy ({args.size})", "\n".join([
        f"{p['model']}: per-layer table on a grid of {p['grid']} widths per layer dimension, fitted on "
        f"{p['anchors']} whole models; checked on {p['check']} random configs of the space (exported and timed "
        f"for real, median of {p['runs']} runs each). nn-Meter's bar on mobile CPUs: 99% within +-10%.", "",
        "| backend | threads | layers / distinct timings | fit a / b (ms) | within +-10% | within +-5% | "
        "mean abs error | max abs error |", "|---|---|---|---|---|---|---|---|", *rows]))


if __name__ == "__main__":
    main()
