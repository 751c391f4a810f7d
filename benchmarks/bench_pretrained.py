"""Pruning a pretrained network: how much accuracy survives pruning before any recovery.

The teacher is a pretrained net already transferred to CIFAR-10 (--teacher, e.g. the ImageNet
MobileNetV2 of ../shared/pretrained trained 2 epochs at 96 px, see RESULTS.md). For each MAC
target, strategy and importance: top-1 on test images of the pruned net as pruned, and after
its BN statistics are re-estimated on training images (`prune.recal_images`). This is the
first column of issue #15's side-by-side table (peers and recovery budgets still to come).

    python benchmarks/bench_pretrained.py --teacher runs/teacher96.pt
"""
from __future__ import annotations

import argparse

import torch

from common import CIFAR, write_section
from compress import load, stages
from compress.batchnorm import recalibrate
from compress.data import sample_images, sample_labelled
from compress.settings import PruneSettings


def top1(model, images, labels) -> float:
    with torch.no_grad():
        return float((model.eval()(images).argmax(1) == labels).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the pretrained, transferred checkpoint (.pt)")
    ap.add_argument("--size", choices=["cpu", "gpu"], default="cpu",
                    help="cpu: 1000 test images; gpu: the whole test split")
    ap.add_argument("--macs", default="90%,70%,50%,30%", help="MAC targets, comma-separated")
    args = ap.parse_args()
    teacher = load(args.teacher).eval()
    card, data = teacher.card, f"cifar10:{CIFAR}"
    images, labels = sample_labelled(data, False, 1000 if args.size == "cpu" else 10000, card.input_size,
                                     card.mean, card.std, seed=1)
    settings = PruneSettings()
    recal = sample_images(data, True, settings.recal_images, card.input_size, card.mean, card.std, seed=0)
    rows = [f"| unpruned | - | - | 100% | {top1(teacher, images, labels):.2%} | - |"]
    for macs in args.macs.split(","):
        for strategy in ("uniform", "global"):
            for importance in ("l1", "l2", "bn"):
                pruned = stages.prune(teacher, settings.model_copy(update={"strategy": strategy,
                                                                          "importance": importance}), macs=macs)
                before = top1(pruned.model, images, labels)
                recalibrate(pruned.model, recal.split(64))
                rows.append(f"| {strategy} | {importance} | {macs} | {pruned.macs / pruned.macs_before:.1%} | "
                            f"{before:.2%} | {top1(pruned.model, images, labels):.2%} |")
                print(rows[-1], flush=True)
    write_section("Pruned pretrained net before recovery", "\n".join([
        f"Teacher `{args.teacher}` ({card.input_size} px); top-1 on {len(images)} CIFAR-10 test images right "
        f"after pruning, with the unpruned net's BN statistics and with them re-estimated on "
        f"{settings.recal_images} training images (what `chansearch prune --data` does). No fine-tuning.", "",
        "| strategy | importance | MAC target | MACs kept | top-1 as pruned | top-1, BN re-estimated |",
        "|---|---|---|---|---|---|", *rows]))


if __name__ == "__main__":
    main()
