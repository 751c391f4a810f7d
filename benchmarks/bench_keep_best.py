"""Keep-best's checks with a teacher: the teacher's held-out outputs remembered from the first
check (`keep_best.Remembered`) against the teacher run at every check, as before.

A pruned net and the net it was cut from (its teacher) are scored on the same held-out training
images: `--checks` checks after the start, as a fine-tune makes them every `eval_every` steps.
The two ways alternate for `--rounds` rounds in one process, and the ratio of their medians is
reported (this machine's speed drifts over minutes).

    python benchmarks/bench_keep_best.py --student runs/quickstart/prune/macs50pct.pt \
        --teacher runs/quickstart/transfer/model.pt
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from common import CIFAR, write_section
from compress import load
from compress.data.specs import sample_labelled
from compress.training.keep_best import Best, Remembered
from compress.training.tasks import Classify

SIZES = {"cpu": dict(images=1000, checks=5, rounds=2), "gpu": dict(images=10000, checks=10, rounds=3)}


class EveryCheck(Remembered):
    """The teacher run on every batch of every check (keep-best before it remembered)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images)


def timed(student, teacher, loader, checks: int, remembered: bool, folder: Path) -> float:
    best = Best(folder / "best.pt", loader, next(student.parameters()).device, False, Classify(), teacher=teacher)
    if not remembered:
        best.teacher = EveryCheck(teacher)
    began = time.perf_counter()
    best.start(student, resumed=False)
    for step in range(1, checks + 1):
        best.check(student, step)
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="the pruned checkpoint")
    ap.add_argument("--teacher", required=True, help="the checkpoint it was cut from")
    ap.add_argument("--data", default=f"cifar10:{CIFAR}")
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args()
    size = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student, teacher = load(args.student).eval().to(device), load(args.teacher).eval().to(device)
    card = student.card
    images, labels = sample_labelled(args.data, True, size["images"], card.input_size, card.mean, card.std, seed=0)
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size)
    seconds = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(size["rounds"]):
            for remembered in (False, True):
                seconds[remembered].append(timed(student, teacher, loader, size["checks"], remembered, Path(tmp)))
    before, after = statistics.median(seconds[False]), statistics.median(seconds[True])
    write_section("Keep-best checks with a teacher", "\n".join([
        f"`{args.student}` ({card.input_size} px) scored against `{args.teacher}` on {size['images']} held-out "
        f"training images: the start and {size['checks']} checks, {size['rounds']} rounds, the two ways alternating, "
        f"{torch.get_num_threads()} thread(s) on {device}.", "",
        "| teacher | seconds for the checks (median) | per check | x before |", "|---|---|---|---|",
        f"| run at every check (before) | {before:.1f} | {before / (size['checks'] + 1):.2f} | 1.00x |",
        f"| remembered from the first check | {after:.1f} | {after / (size['checks'] + 1):.2f} | "
        f"{after / before:.2f}x |"]))


if __name__ == "__main__":
    main()
