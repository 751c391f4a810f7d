"""Pruning to a measured latency, side by side with pruning to MACs at the same measured latency.

The teacher is a pretrained net transferred to the data at its real resolution (--teacher: the
shared ImageNet MobileNetV2 trained on CIFAR-10 at 224 px, see RESULTS.md). For each budget (a
share of the unpruned file's measured time on the clock: TFLite, float or --int8, 1 thread):

- `latency`: `chansearch prune --latency SHARE --data` (the cut keeps the most importance per
  predicted millisecond, measured and corrected until the file runs within 5% under the budget);
- `macs`: `chansearch prune --macs P --data` (today's global allocation by importance), with the
  MAC share P found by bisection on the same clock: the largest P whose file measures under the
  same budget, so both files run in (nearly) the same measured time.

- `search`: the supernet path under the same budget: a slimmable supernet trained from the
  teacher (bench_pretrained.py's, channels in `prune --data` order), AutoSlim's greedy search
  with its `latency` budget judged by the same latency model (cached on this machine), the
  searched widths cut from the teacher and refitted (`extract --teacher`). Its pick is measured
  and, where it misses the budget, searched again under a corrected target (up to 3 searches,
  as `search --latency` does); the greedy steps are coarse, so it may still land further under
  the budget than the direct cut: the table says.

All are refitted on the same training pool (energy ranking, least squares). Each is scored
after the refit, and after each recovery (--recoveries) with several seeds: `plain`, the loop a
user writes (bench_recovery.py's: SGD, cosine, 0.7 KD + 0.3 CE, 3 epochs of batch 32 over the
user's images, lr 0.01: that loop's best lr at 224 px), and `finetune`, `chansearch finetune
--teacher` with its defaults on the same images (bench_recovery.py's). Cells are kept under
--cells, so an interrupted run goes on.

    python benchmarks/bench_latency_budget.py --teacher runs/teacher224/model.pt --size cpu

`--first-call`: only the time a user waits for `chansearch prune --latency 60%` (or `--budget`,
a share or a time like 2.5ms; `--threads`), float and int8, on a machine with no latency model
cached (it builds one first), against the same command run again right after (cached); each
pruned file is then timed again, beside the unpruned one, as a user would check it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pretrained import SIZES as SEARCH_SIZES, supernet_path
from bench_recovery import how_finetuned, recover_finetune, recover_plain, scores, user_images
from common import CIFAR, mean_std, write_section
from compress import load, save_checkpoint, stages
from compress.data.specs import sample_labelled
from compress.export.latency import SLACK, measure_beside
from compress.files import atomic_write_json
from compress.latency import Clock
from compress.latency.build import BesideUnpruned
from compress.pruning.allocation import allocate
from compress.pruning.importance import scores_on
from compress.pruning.prune import prune_with_map, space_for
from compress.pruning.profile import count
from compress.settings import LutSettings, PruneSettings, Target
from compress.stages.pruning import pruning_batch
from compress.units import parse_latency

SIZES = {  # search: bench_pretrained.py's size for the supernet and its search, and the size the search scores at
    "quick": dict(budgets=(0.6,), test=64, images=64, epochs=1, seeds=1, search=("quick", None)),
    "cpu": dict(budgets=(0.5,), test=1000, images=500, epochs=3, seeds=3, search=("cpu224", 96)),
    "gpu": dict(budgets=(0.7, 0.5, 0.35), test=10000, images=5000, epochs=3, seeds=3, search=("gpu", None)),
}
ALLOCATIONS = ("latency", "macs", "search")
RECOVERIES = ("plain", "finetune")


def macs_at_equal_time(teacher, timer: BesideUnpruned, share: float, batch) -> float:
    """The largest MAC share (of the unpruned model) whose global cut measures under `share` of
    the unpruned file's time, each cut timed beside the unpruned file (this machine drifts)."""
    space = timer.space
    ranking = scores_on(copy.deepcopy(teacher).eval(), space, PruneSettings().importance_for(True), batch)
    full = space.macs(space.max())

    def ratio(macs: float) -> float:
        config = allocate(space, {"macs": int(macs * full)}, "global", ranking)
        return timer.nets([prune_with_map(teacher, config, space, scores=ranking)[0]])[0][0]
    lo, hi = 0.05, 1.0
    for _ in range(7):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio(mid) <= share else (lo, mid)
    return lo


def first_call(teacher: str, data: str, cells: Path, budget: str = "60%", threads: int = 1,
               dtypes: tuple[str, ...] = ("float", "int8")) -> None:
    """`prune --latency BUDGET` with an empty latency cache, then again with the model it cached;
    each pruned file then timed again, in turns with the unpruned file, from the turns where that
    ran near its fastest, as a user's own check would."""
    rows = ["| file | call | wall time | measured ms (x budget) | cuts | timed again: ms (x budget) |",
            "|---|---|---|---|---|---|"]
    unpruned = load(teacher)
    for dtype in dtypes:
        cache = cells / f"cache_{dtype}_{threads}"
        shutil.rmtree(cache, ignore_errors=True)
        clock = Clock("tflite", threads, dtype == "int8")
        for call in ("first (builds the latency model)", "second (cached)"):
            out = cells / f"first_call_{dtype}_{threads}_{call.split()[0]}.pt"
            cmd = [sys.executable, "-m", "compress", "prune", teacher, "--latency", budget, "--runtime", "tflite",
                   "--threads", str(threads), *(["--int8"] if dtype == "int8" else []), "--data", data,
                   "-o", str(out)]
            print("$", " ".join(cmd[1:]), flush=True)
            began = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "COMPRESS_CACHE": str(cache)})
            seconds = time.perf_counter() - began
            t = load(out).card.provenance["latency"]
            again = timed_again(clock, load(out), unpruned)
            again_budget = parse_latency(budget, again["reference_ms"])
            rows.append(f"| {dtype} TFLite | {call} | {seconds // 60:.0f} min {seconds % 60:02.0f} s | "
                        f"{t['measured_ms']:.3f} ({t['measured_ms'] / t['budget_ms']:.3f}) | {len(t['attempts'])} | "
                        f"{again['ms']:.3f} ({again['ms'] / again_budget:.3f}) |")
    # the 4-minute bar reads the section without a suffix
    plural = "s" if threads > 1 else ""
    suffix = "" if (budget, threads, dtypes) == ("60%", 1, ("float", "int8")) else \
        f" ({' and '.join(dtypes)}, {budget}, {threads} thread{plural})"
    write_section("Pruning to a measured latency: the first call" + suffix, "\n".join([
        f"`chansearch prune {teacher} --latency {budget} --runtime tflite --threads {threads} [--int8] --data "
        f"{data}`: the wall time of the whole command (the model loaded, the latency model built when none is "
        "cached, the cut and its refit, every file exported and timed), with nothing cached, then the same command "
        "again right after. Timed again: the pruned file after the command, 5 times in turns of 10 invokes with the "
        f"unpruned file (200 invokes each), each from the turns where the unpruned file ran within {SLACK:.0%} of "
        "its fastest turn so far; the median of those timings where it ran within that of its fastest timing (a "
        "share budget is of the unpruned file's time in them).", "", *rows]))


def timed_again(clock: Clock, pruned, unpruned, timings: int = 5) -> dict:
    """`pruned`'s file timed afresh on `clock`, beside `unpruned`'s (see `measure_beside`),
    `timings` times, each from the turns near the fastest turn of all so far: the medians of
    the timings where the unpruned file ran within SLACK of its fastest (`ms`, `reference_ms`).
    A single timing can fall in a slow phase whole (one of an int8 file at 2 threads here ran
    1.23x the cut's time in the loop)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{name}.tflite" for name in ("pruned", "unpruned")]
        for net, path in zip((pruned, unpruned), paths):
            clock.export(net, net.card.input_size, path)
        timed, fastest = [], None
        for _ in range(timings):
            timed.append(measure_beside(*paths, clock.threads, clock.warmup, 200, fastest))
            fastest = timed[-1]["fastest_ms"]
    near = [t for t in timed if t["reference_ms"] <= (1 + SLACK) * min(t["reference_ms"] for t in timed)]
    return {k: statistics.median(t[k] for t in near) for k in ("ms", "reference_ms")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the transferred teacher checkpoint")
    ap.add_argument("--data", default=f"cifar10:{CIFAR}", help="its data (cifar10:DIR with train/test.npz)")
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--int8", action="store_true", help="budgets on the int8 TFLite file")
    ap.add_argument("--budgets", help="budgets in place of the size's, as shares of the unpruned time: 0.7,0.5,0.35")
    ap.add_argument("--lr", type=float, default=0.01, help="the plain loop's lr")
    ap.add_argument("--allocations", default=",".join(ALLOCATIONS), help="which cuts, of " + ", ".join(ALLOCATIONS))
    ap.add_argument("--recoveries", default=",".join(RECOVERIES), help="which recoveries, of " + ", ".join(RECOVERIES))
    ap.add_argument("--cells", default="runs/bench_latency_budget", help="folder of finished cells (resumable)")
    ap.add_argument("--label", help="write the table to a RESULTS section of its own, named with this label")
    ap.add_argument("--first-call", action="store_true", help="only the wall time of `prune --latency BUDGET` "
                    "with nothing cached, against the same call cached, each file timed again after")
    ap.add_argument("--budget", default="60%", help="--first-call's budget: a share (60%%) or a time (2.5ms)")
    ap.add_argument("--threads", type=int, default=1, help="--first-call's thread count")
    ap.add_argument("--dtypes", default="float,int8", help="--first-call's files: float, int8 or both")
    args = ap.parse_args()
    if args.first_call:
        Path(args.cells).mkdir(parents=True, exist_ok=True)
        return first_call(args.teacher, args.data, Path(args.cells), args.budget, args.threads,
                          tuple(args.dtypes.split(",")))
    size, cells = SIZES[args.size], Path(args.cells) / ("int8" if args.int8 else "float")
    cells.mkdir(parents=True, exist_ok=True)
    teacher = load(args.teacher).eval()
    card = teacher.card
    lut = LutSettings(int8=args.int8)
    clock = Clock("tflite", int8=args.int8, runs=lut.runs)
    space = space_for(teacher)
    test = sample_labelled(args.data, False, size["test"], card.input_size, card.mean, card.std, seed=1)
    allocations, recoveries = args.allocations.split(","), args.recoveries.split(",")
    rows = ["| budget (x unpruned time) | allocation | MACs (x unpruned) | measured (x unpruned) | after refit top-1 % | "
            "fidelity % | " + " | ".join(f"{r} top-1 % | fidelity %" for r in recoveries) + " | seeds |",
            "|---" * (7 + 2 * len(recoveries)) + "|"]
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else size["budgets"]
    with tempfile.TemporaryDirectory() as tmp:
        timer = BesideUnpruned(teacher, space, clock, Path(tmp))
        for share in budgets:
            paths = {kind: cut(kind, share, cells, teacher, timer, lut, args.data, size) for kind in allocations}
            # every allocation's file timed in one window, each beside the unpruned file: equal time on one clock
            measured = [statistics.median(t) for t in timer.nets([load(p) for p in paths.values()], repeats=3)]
            for (kind, path), ratio in zip(paths.items(), measured):
                meta = json.loads(path.with_suffix(".json").read_text())
                refit = scores(load(path), teacher, *test)
                tuned = {r: [recovered(cells / f"{kind}_{share:.2f}_{r}_{seed}.json", r, path, teacher, test, seed,
                                       args, size) for seed in range(size["seeds"])] for r in recoveries}
                rows.append(f"| {share:.0%} | {kind} | {meta['macs']:.3f} | {ratio:.3f} | {100 * refit['top1']:.1f} | "
                            f"{100 * refit['fidelity']:.1f} | " + " | ".join(
                                f"{mean_std([t['top1'] for t in tuned[r]])} | {mean_std([t['fidelity'] for t in tuned[r]])}"
                                for r in recoveries) + f" | {size['seeds']} |")
        unpruned = timer.unpruned_ms
    teacher_scores = scores(teacher, teacher, *test)
    write_section(f"Pruning to a measured latency ({args.size}, {'int8' if args.int8 else 'float'} TFLite)"
                  + (f": {args.label}" if args.label else ""),
                  "\n".join([
                      f"Teacher `{args.teacher}`: {card.input_size} px, test top-1 {teacher_scores['top1']:.1%} on "
                      f"{size['test']} test images; unpruned file {unpruned:.3f} ms ({clock.describe()}, settled over "
                      "this run's timings). Measured: the median of 3 timings of each file, each as a ratio to the "
                      "unpruned file, the two in turns, every allocation's file in one window. Recovery: "
                      f"{size['epochs']} epochs of batch 32 over {size['images']} training images, one seed per "
                      f"row entry; the plain loop at lr {args.lr}, `finetune` at its defaults (the lr trial picks).",
                      "", *rows]))


def cut(kind: str, share: float, cells: Path, teacher, timer: BesideUnpruned, lut: LutSettings, data: str,
        size: dict) -> Path:
    """The file of allocation `kind` for the budget `share` of the unpruned time (made once,
    kept with its MAC share and seconds)."""
    path = cells / f"{kind}_{share:.2f}.pt"
    if path.exists():
        return path
    began = time.perf_counter()
    if kind == "latency":
        stages.prune(copy.deepcopy(teacher), latency=f"{share:.0%}", clock=lut, data=data, output=path)
    elif kind == "macs":
        macs = macs_at_equal_time(teacher, timer, share, pruning_batch(teacher, PruneSettings(), data))
        stages.prune(copy.deepcopy(teacher), macs=f"{100 * macs:.2f}%", data=data, output=path)
    else:
        search_size, score_size = size["search"]
        ctx = {"size": SEARCH_SIZES[search_size], "data": data, "score_size": score_size}
        save_checkpoint(path, supernet_path(teacher, Target(latency=f"{share:.0%}"), ctx, cells, "slimmable", True,
                                            clock=lut))
    full = count(teacher, teacher.card.input_size)[0]
    atomic_write_json(path.with_suffix(".json"), {"macs": count(load(path), teacher.card.input_size)[0] / full,
                                                  "seconds": round(time.perf_counter() - began, 1)})
    return path


def recovered(cell: Path, recovery: str, pruned: Path, teacher, test, seed: int, args, size: dict) -> dict:
    """The scores of the pruned file after one recovery and seed (kept in `cell`)."""
    if not cell.exists():
        spec = user_images(cell.parent, args.data, size["images"], seed)
        began, how = time.perf_counter(), {"lr": args.lr}
        if recovery == "plain":
            card = teacher.card
            pool = sample_labelled(spec, True, size["images"], card.input_size, card.mean, card.std, seed=0)
            tuned = recover_plain(pruned, teacher, pool, size["epochs"], seed, args.lr)
        else:
            run = cell.parent / "runs" / cell.stem
            tuned = recover_finetune(pruned, teacher, spec, size["epochs"], seed, run)
            how = how_finetuned(run)
        atomic_write_json(cell, {**how, "seconds": round(time.perf_counter() - began, 1),
                                 **scores(tuned, teacher, *test)})
    return json.loads(cell.read_text())


if __name__ == "__main__":
    main()
