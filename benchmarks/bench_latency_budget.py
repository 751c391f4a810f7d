"""Pruning to a measured latency, side by side with pruning to MACs at the same measured latency.

The teacher is a pretrained net transferred to the data at its real resolution (--teacher: the
shared ImageNet MobileNetV2 trained on CIFAR-10 at 224 px, see RESULTS.md). For each budget (a
share of the unpruned file's measured time on the clock: TFLite, float or --int8, 1 thread):

- `latency`: `chansearch prune --latency SHARE --data` (the cut keeps the most importance per
  predicted millisecond, measured and corrected until the file runs within 5% under the budget);
- `macs`: `chansearch prune --macs P --data` (today's global allocation by importance), with the
  MAC share P found by bisection on the same clock: the largest P whose file measures under the
  same budget, so both files run in (nearly) the same measured time.

Both are refitted on the same training pool (energy ranking, least squares). Each is scored
after the refit, and after the plain recovery a user writes (bench_recovery.py's loop: SGD,
cosine, 0.7 KD + 0.3 CE, 3 epochs of batch 32 over the user's images, lr 0.01: that loop's best
lr at 224 px) with several seeds. Cells are kept under --cells, so an interrupted run goes on.

    python benchmarks/bench_latency_budget.py --teacher runs/teacher224/model.pt --size cpu

`--first-call`: only the time a user waits for `chansearch prune --latency 60%`, float and int8,
on a machine with no latency model cached (it builds one first), against the same command run
again right after (cached).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_recovery import recover_plain, scores, user_images
from common import CIFAR, mean_std, write_section
from compress import load, stages
from compress.data.specs import sample_labelled
from compress.files import atomic_write_json
from compress.latency import Clock, cached_latency_model
from compress.pruning.allocation import allocate
from compress.pruning.importance import scores_on
from compress.pruning.prune import prune_with_map, space_for
from compress.settings import LutSettings, PruneSettings
from compress.stages.pruning import pruning_batch

SIZES = {
    "quick": dict(budgets=(0.6,), test=64, images=64, epochs=1, seeds=1),
    "cpu": dict(budgets=(0.5,), test=1000, images=500, epochs=3, seeds=3),
    "gpu": dict(budgets=(0.7, 0.5, 0.35), test=10000, images=5000, epochs=3, seeds=3),
}


def macs_at_equal_time(teacher, clock: Clock, limit_ms: float, batch) -> tuple[float, float]:
    """The largest MAC share (of the unpruned model) whose global cut measures under `limit_ms`."""
    space = space_for(teacher)
    ranking = scores_on(copy.deepcopy(teacher).eval(), space, PruneSettings().importance_for(True), batch)
    full = space.macs(space.max())

    def timed(share: float) -> float:
        config = allocate(space, {"macs": int(share * full)}, "global", ranking)
        return clock.time(prune_with_map(teacher, config, space, scores=ranking)[0], space.input_size[-1])
    lo, hi, at_lo = 0.05, 1.0, None
    for _ in range(7):
        mid = (lo + hi) / 2
        ms = timed(mid)
        lo, hi, at_lo = (mid, hi, ms) if ms <= limit_ms else (lo, mid, at_lo)
    return lo, at_lo if at_lo is not None else timed(lo)


def first_call(teacher: str, data: str, cells: Path) -> None:
    """`prune --latency 60%` with an empty latency cache, then again with the model it cached."""
    rows = ["| file | call | wall time | measured ms (x budget) | cuts |", "|---|---|---|---|---|"]
    for dtype in ("float", "int8"):
        cache = cells / f"cache_{dtype}"
        shutil.rmtree(cache, ignore_errors=True)
        for call in ("first (builds the latency model)", "second (cached)"):
            out = cells / f"first_call_{dtype}_{call.split()[0]}.pt"
            cmd = [sys.executable, "-m", "compress", "prune", teacher, "--latency", "60%", "--runtime", "tflite",
                   *(["--int8"] if dtype == "int8" else []), "--data", data, "-o", str(out)]
            print("$", " ".join(cmd[1:]), flush=True)
            began = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "COMPRESS_CACHE": str(cache)})
            seconds = time.perf_counter() - began
            t = load(out).card.provenance["latency"]
            rows.append(f"| {dtype} TFLite | {call} | {seconds // 60:.0f} min {seconds % 60:02.0f} s | "
                        f"{t['measured_ms']:.3f} ({t['measured_ms'] / t['budget_ms']:.3f}) | {len(t['attempts'])} |")
    write_section("Pruning to a measured latency: the first call", "\n".join([
        f"`chansearch prune {teacher} --latency 60% --runtime tflite [--int8] --data {data}` (1 thread): the wall "
        "time of the whole command (the model loaded, the latency model built when none is cached, the cut and its "
        "refit, every file exported and timed), with nothing cached, then the same command again right after.", "",
        *rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the transferred teacher checkpoint")
    ap.add_argument("--data", default=f"cifar10:{CIFAR}", help="its data (cifar10:DIR with train/test.npz)")
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--int8", action="store_true", help="budgets on the int8 TFLite file")
    ap.add_argument("--lr", type=float, default=0.01, help="the plain loop's lr")
    ap.add_argument("--cells", default="runs/bench_latency_budget", help="folder of finished cells (resumable)")
    ap.add_argument("--first-call", action="store_true", help="only the wall time of `prune --latency 60%%` with "
                    "nothing cached, against the same call cached")
    args = ap.parse_args()
    if args.first_call:
        Path(args.cells).mkdir(parents=True, exist_ok=True)
        return first_call(args.teacher, args.data, Path(args.cells))
    size, cells = SIZES[args.size], Path(args.cells) / ("int8" if args.int8 else "float")
    cells.mkdir(parents=True, exist_ok=True)
    teacher = load(args.teacher).eval()
    card = teacher.card
    lut = LutSettings(int8=args.int8)
    clock = Clock("tflite", int8=args.int8, runs=lut.runs)
    unpruned = cached_latency_model(teacher, space_for(teacher), clock, lut.samples).unpruned_ms
    test = sample_labelled(args.data, False, size["test"], card.input_size, card.mean, card.std, seed=1)
    rows = ["| budget (x unpruned time) | allocation | MACs (x unpruned) | measured ms (x budget) | after refit top-1 % | "
            "fidelity % | plain recovery top-1 % | fidelity % | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for share in size["budgets"]:
        limit = share * unpruned
        for kind in ("latency", "macs"):
            path = cells / f"{kind}_{share:.2f}.pt"
            info = cells / f"{kind}_{share:.2f}.json"
            if not path.exists():
                began = time.perf_counter()
                if kind == "latency":
                    done = stages.prune(copy.deepcopy(teacher), latency=f"{share:.0%}", clock=lut, data=args.data,
                                        output=path)
                    ms = done.latency["measured_ms"]
                else:
                    batch = pruning_batch(teacher, PruneSettings(), args.data)
                    macs, _ = macs_at_equal_time(teacher, clock, limit, batch)
                    done = stages.prune(copy.deepcopy(teacher), macs=f"{100 * macs:.2f}%", data=args.data,
                                        output=path)
                    ms = clock.time(copy.deepcopy(done.model), card.input_size)
                atomic_write_json(info, {"measured_ms": ms, "macs": done.macs / done.macs_before,
                                         "seconds": round(time.perf_counter() - began, 1)})
            meta = json.loads(info.read_text())
            refit = scores(load(path), teacher, *test)
            tuned = []
            for seed in range(size["seeds"]):
                cell = cells / f"{kind}_{share:.2f}_plain_{seed}.json"
                if not cell.exists():
                    spec = user_images(cells, args.data, size["images"], seed)
                    pool = sample_labelled(spec, True, size["images"], card.input_size, card.mean, card.std, seed=0)
                    atomic_write_json(cell, scores(recover_plain(path, teacher, pool, size["epochs"], seed, args.lr),
                                                   teacher, *test))
                tuned.append(json.loads(cell.read_text()))
            rows.append(f"| {share:.0%} ({limit:.2f} ms) | {kind} | {meta['macs']:.3f} | {meta['measured_ms']:.3f} "
                        f"({meta['measured_ms'] / limit:.3f}) | {100 * refit['top1']:.1f} | {100 * refit['fidelity']:.1f} | "
                        f"{mean_std([t['top1'] for t in tuned])} | {mean_std([t['fidelity'] for t in tuned])} | "
                        f"{len(tuned)} |")
    teacher_scores = scores(teacher, teacher, *test)
    write_section(f"Pruning to a measured latency ({args.size}, {'int8' if args.int8 else 'float'} TFLite)",
                  "\n".join([
                      f"Teacher `{args.teacher}`: {card.input_size} px, test top-1 {teacher_scores['top1']:.1%} on "
                      f"{size['test']} test images; unpruned file {unpruned:.3f} ms ({clock.describe()}). Plain "
                      f"recovery: {size['epochs']} epochs of batch 32 over {size['images']} training images, lr "
                      f"{args.lr}, one seed per row entry.", "", *rows]))


if __name__ == "__main__":
    main()
