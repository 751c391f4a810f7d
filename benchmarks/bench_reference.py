"""Uniform-width baselines: mobilenet_v2_cifar at 1.0x, 0.75x, 0.5x and 0.35x trained on
CIFAR-10 with one budget, test accuracy reported. The channel-search issues must beat these
at equal MACs and equal training budget.

`--size cpu` fits about an hour on 2 CPU cores; `--size gpu` is the full-scale schedule
(200 epochs) for a GPU. Each width trains in its own run folder under --out, so an
interrupted benchmark resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import CIFAR, write_section
from compress import build, count, save_checkpoint
from compress.data.specs import eval_set, loader
from compress.training.evaluate import evaluate
from compress.settings import DataSettings, TrainSettings
from compress.training.loop import STATE_FILE, fit

SIZES = {  # epochs, batch, lr
    "cpu": dict(epochs=5, batch_size=128, lr=0.1),
    "gpu": dict(epochs=200, batch_size=128, lr=0.1),
    "quick": dict(epochs=1, batch_size=64, lr=0.05, steps_per_epoch=10),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--data", default=f"cifar10:{CIFAR}")
    ap.add_argument("--widths", default="1.0,0.75,0.5,0.35")
    ap.add_argument("--out", default="runs/reference")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = SIZES[args.size]
    rows = []
    for width in [float(w) for w in args.widths.split(",")]:
        batch = preset.get("batch_size", 128)
        cfg = TrainSettings(**{k: v for k, v in preset.items() if k != "batch_size"}, weight_decay=5e-4,
                            label_smoothing=0.1, channels_last=True, amp="bf16" if device == "cuda" else "none",
                            val_images=1000)
        data = DataSettings(spec=args.data, batch_size=batch, workers=args.workers)
        run = Path(args.out) / args.size / f"w{width}"
        torch.manual_seed(0)
        model = build("mobilenet_v2_cifar", width_mult=width)
        trained = fit(model, data, cfg, run, resume=(run / STATE_FILE).exists(), quiet=True)
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        minutes = sum(h["seconds"] for h in history) / 60  # resumed runs included
        card = trained.card
        save_checkpoint(run / "model.pt", trained, provenance={"created_by": "benchmarks/bench_reference.py",
                                                                "data": args.data, **preset})
        test = evaluate(trained, loader(eval_set(args.data, 32, card.mean, card.std, 10), 256, args.workers), device)
        macs, params = count(trained, 32)
        rows.append(f"| {width} | {macs / 1e6:.2f}M | {params / 1e6:.3f}M | {test['top1']:.2%} | {test['top5']:.2%} | {minutes:.1f} |")
        print(rows[-1], flush=True)
    settings = ", ".join(f"{k}={v}" for k, v in preset.items())
    write_section(f"Uniform-width baselines ({args.size})", "\n".join([
        f"mobilenet_v2_cifar trained from scratch on `{args.data}` (25,000 training images), evaluated on "
        f"the 10,000 test images. Same budget for every width: {settings}, SGD Nesterov, cosine, weight "
        "decay 5e-4, label smoothing 0.1, pad-crop + flip. 'train min' sums the epochs' training time "
        "(metrics.jsonl) on this machine, other work running beside it included.", "",
        "| width | MACs | params | test top-1 | test top-5 | train min |", "|---|---|---|---|---|---|", *rows]))


if __name__ == "__main__":
    main()
