"""Training throughput of compress's loop against a bare PyTorch loop doing the same work.

Both use the same model, data loader, optimizer and schedule; the bare loop has nothing
else (no progress, metrics, NaN checks or checkpoints). Both are timed in steady state:
`fit` runs two epochs of --steps steps and its second epoch's images/s is taken (its
loader workers persist); the bare loop runs 2 x --steps steps and times the second half.
Runs alternate and the median of each is compared, in the same process.
Target: overhead at most 5%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from common import CIFAR, write_section
from compress import build
from compress.data.specs import train_holdout
from compress.settings import DataSettings, TrainSettings
from compress.training.loop import fit
from compress.training.optim import lr_lambda, param_groups


def bare_loop(model, loader, cfg, steps, device):
    """The 20-line reference: what any PyTorch user would write."""
    model.to(device).train()
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))  # same schedule as fit
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    seen, began = 0, None
    for i, (images, labels) in enumerate(loader):
        if i == steps:  # the first `steps` are warm-up: worker start, allocator
            seen, began = 0, time.perf_counter()
        if i >= 2 * steps:
            break
        images, labels = images.to(device), labels.to(device)
        if cfg.channels_last:
            images = images.to(memory_format=torch.channels_last)
        loss = criterion(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen += len(labels)
    return seen / (time.perf_counter() - began)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="mobilenet_v2_cifar")
    ap.add_argument("--data", default=f"cifar10:{CIFAR}")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30, help="steps per timed run (GPU: 300)")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainSettings(epochs=2, steps_per_epoch=args.steps, channels_last=args.channels_last)
    data = DataSettings(spec=args.data, batch_size=args.batch_size, workers=args.workers)
    ours, bare = [], []

    def run_bare(r):
        torch.manual_seed(r)
        model = build(args.model)
        card = model.card
        train, _, _ = train_holdout(args.data, card.input_size, card.mean, card.std, card.num_classes)
        sampler = DistributedSampler(train, 1, 0, shuffle=True, seed=r, drop_last=True)
        loader = DataLoader(train, args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        bare.append(bare_loop(model, loader, cfg, args.steps, device))

    def run_ours(r):
        torch.manual_seed(r)
        with tempfile.TemporaryDirectory() as run:
            fit(build(args.model), data, cfg, run, validate=False, quiet=True)
            ours.append(json.loads(open(f"{run}/metrics.jsonl").readlines()[1])["images_per_s"])

    for r in range(args.repeats):  # alternate which goes first: the machine drifts
        for fn in ((run_bare, run_ours) if r % 2 == 0 else (run_ours, run_bare)):
            fn(r)
        print(f"repeat {r + 1}: bare {bare[-1]:.1f} img/s, compress {ours[-1]:.1f} img/s", flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    write_section("Training loop overhead", "\n".join([
        f"{args.model}, batch {args.batch_size}, {args.steps} timed steps per run after {args.steps} warm-up steps, {args.repeats} alternating runs, "
        f"{args.workers} loader workers, channels_last={args.channels_last}, device {device}. "
        "Images/s (median). Target: overhead at most 5%.", "",
        "| loop | images/s (median) | all runs |", "|---|---|---|",
        f"| bare PyTorch loop | {b:.1f} | {', '.join(f'{x:.1f}' for x in bare)} |",
        f"| compress `fit` | {o:.1f} | {', '.join(f'{x:.1f}' for x in ours)} |",
        "", f"Overhead: {(b / o - 1) * 100:+.1f}% (time per image, ours vs bare)."]))


if __name__ == "__main__":
    main()
