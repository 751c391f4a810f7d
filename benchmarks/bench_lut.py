"""Accuracy of the latency model (`chansearch lut`) against measured whole models.

For each model and clock (runtime, float or int8 file, threads): fit the latency model on
`--samples` whole models, then export and time random configs it never saw and report how
many predictions fall within +-10% and +-5% (nn-Meter's bar on mobile CPUs: 99% within
+-10%), with the build time. Each cell's record is kept under `--out`, so an interrupted run
goes on where it stopped and `--table-only` rebuilds the table. The table scores every cell with
this version's fit, refitted on the cell's own recorded timings, beside the cell as it was built.

`--size cpu`: MobileNetV2 (float and int8 TFLite at 1 and 2 threads), MobileNetV3-Large, LRASPP
and ResNet-50 (float TFLite, 1 thread), every model on ONNX Runtime (float and int8, 1 thread),
30 check configs each; `full`: every model on every clock, 50 configs; `quick`:
a tiny model on ONNX Runtime. `--noise`: how far repeated timings of one cut (as a ratio to the
unpruned file) spread, timed one after the other or in turns, the floor under any latency
model's error. `--build-time`: the MobileNetV2 float TFLite model built twice in a row,
pinned to one core (conversions one after another) and on every core (a conversion per core), as a
ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import write_section
from compress import build
from compress.latency.build import check_scores
from compress.export.latency import SLACK, measure, measure_in_turns
from compress.latency.clock import TIMING, Clock
from compress.latency.layers import layer_records, tile_name
from compress.latency.model import LatencyModel
from compress.pruning.prune import prune
from compress.pruning.space import ChannelConfig
from compress.stages import lut_model_space
from compress.latency.workers import cores

CLOCKS = {"tflite-1": ["--runtime", "tflite", "--threads", "1"],
          "tflite-int8-1": ["--runtime", "tflite", "--int8", "--threads", "1"],
          "tflite-2": ["--runtime", "tflite", "--threads", "2"],
          "tflite-int8-2": ["--runtime", "tflite", "--int8", "--threads", "2"],
          "onnxruntime-1": ["--runtime", "onnxruntime", "--threads", "1"],
          "onnxruntime-int8-1": ["--runtime", "onnxruntime", "--int8", "--threads", "1"]}
MODELS = {"mobilenet_v2": [], "torchvision:mobilenet_v3_large": [], "torchvision:resnet50": [],
          "torchvision:lraspp_mobilenet_v3_large": ["--num-classes", "21"]}
SIZES = {
    "cpu": dict(cells=[("mobilenet_v2", c) for c in ("tflite-1", "tflite-int8-1", "onnxruntime-1")]
                + [("torchvision:mobilenet_v3_large", "tflite-1"), ("torchvision:lraspp_mobilenet_v3_large", "tflite-1"),
                   ("mobilenet_v2", "tflite-2"), ("mobilenet_v2", "tflite-int8-2"), ("torchvision:resnet50", "tflite-1")]
                + [(m, c) for m in MODELS for c in ("onnxruntime-1", "onnxruntime-int8-1") if (m, c) != ("mobilenet_v2", "onnxruntime-1")],
                check=30, samples=24),
    "full": dict(cells=[(m, c) for m in MODELS for c in CLOCKS], check=50, samples=24),
    "gpu": dict(cells=[(m, c) for m in MODELS for c in CLOCKS], check=50, samples=24),  # a larger CPU beside it
    "quick": dict(cells=[("mobilenet_v3_small_cifar", "onnxruntime-1")], check=5, samples=6,
                  extra=["--input-size", "16"]),
}


def cell(model: str, clock: str, p: dict, out: Path) -> dict:
    path = out / f"{model.replace(':', '_')}__{clock}.json"
    if not path.exists():
        cmd = [sys.executable, "-m", "compress", "lut", model, *MODELS.get(model, []), *p.get("extra", []),
               *CLOCKS[clock], "--samples", str(p["samples"]), "--check", str(p["check"]), "--quiet", "-o", str(path)]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(path.read_text())


def build_time(out: Path, samples: int) -> None:
    """The build on one core against the build on all of them, back to back, and what one
    sample costs: its conversion and its timing."""
    times = {}
    for label in ("one core", "every core"):
        path = out / f"build_{label.replace(' ', '_')}.json"
        pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if label == "one core" else []
        cmd = [*pin, sys.executable, "-m", "compress", "lut", "mobilenet_v2", *CLOCKS["tflite-1"], "--samples",
               str(samples), "--check", "0", "--quiet", "-o", str(path)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "COMPRESS_CACHE": str(out / "no-cache")})
        times[label] = json.loads(path.read_text())["build_s"]
    convert_s, timing_s = one_sample(out)
    write_section("Latency model build time", "\n".join([
        f"MobileNetV2 at 224 px, float TFLite at 1 thread, {samples} whole models exported and timed, built twice "
        f"back to back: pinned to one core (`taskset`), then on the {cores()} cores this process may use (a "
        "conversion per core; the files are all converted before any is timed). One sample, in this process: its "
        f"conversion {convert_s:.1f} s, its timing (two sessions of 50 runs) {timing_s:.2f} s.", "",
        "| cores | build | x one core |", "|---|---|---|",
        *[f"| {k} | {v:.0f} s | {v / times['one core']:.2f} |" for k, v in times.items()]]))


def one_sample(out: Path) -> tuple[float, float]:
    """Seconds to convert the unpruned MobileNetV2 to float TFLite (a second conversion: the
    first also loads the converter), and to time the file."""
    clock, net, path = Clock(), build("mobilenet_v2").eval(), out / "one_sample.tflite"
    clock.export(net, 224, path)
    began = time.perf_counter()
    clock.export(net, 224, path)
    converted = time.perf_counter()
    clock.measure_file(path)
    return converted - began, time.perf_counter() - converted


def noise(out: Path, repeats: int) -> None:
    """Half-width MobileNetV2 against the unpruned one (float TFLite, 224 px), its time as a
    ratio to the unpruned file's `repeats` times: the two timed one after the other (the
    lower of two sessions' medians each, as before), and in turns (`Clock.ratio`). The two
    ways alternate, so the machine's drift falls on both alike."""
    net = build("mobilenet_v2").eval()
    _, space = lut_model_space(net)
    paths = {name: out / f"noise_{name}.tflite" for name in ("unpruned", "half")}
    for (name, path), config in zip(paths.items(), (space.max(), space.uniform(0.5))):
        Clock().export(prune(net, config, space, importance="first"), 224, path)
    def apart(clock: Clock, path: Path) -> float:  # the lower of two sessions' medians
        return min(measure(path, "tflite", clock.threads, clock.warmup, clock.runs)["median_ms"] for _ in range(2))

    ways = {"one after the other": lambda c: apart(c, paths["half"]) / apart(c, paths["unpruned"]),
            "in turns": lambda c: c.ratio(paths["half"], paths["unpruned"])["ratio"]}
    rows = []
    for threads in (1, 2):
        clock = Clock(threads=threads)
        ratios, seconds = {w: [] for w in ways}, dict.fromkeys(ways, 0.0)
        for _ in range(repeats):
            for way, timed in ways.items():
                began = time.perf_counter()
                ratios[way].append(timed(clock))
                seconds[way] += time.perf_counter() - began
        for way, r in ratios.items():
            dev = np.abs(np.array(r) / np.median(r) - 1)
            rows.append(f"| {threads} | {way} | {np.median(r):.3f} | {100 * np.std(r) / np.mean(r):.2f}% | "
                        f"{np.mean(dev <= 0.025):.0%} | {np.mean(dev <= 0.05):.0%} | {100 * dev.max():.1f}% | "
                        f"{seconds[way] / repeats:.2f} s |")
    write_section("Latency timing noise", "\n".join([
        f"MobileNetV2 at 224 px, float TFLite: the half-width cut's time as a ratio to the unpruned file's, taken "
        f"{repeats} times each way, the ways alternating: one after the other (each file the lower of two sessions' "
        "medians of 50 runs) or in turns of 10 invokes (2 of each left out), 13 turns: 104 timed invokes a file "
        "against 100. Spread: how far one ratio lies from the way's median ratio.", "",
        "| threads | timed | median ratio | std | within +-2.5% | within +-5% | max | seconds a ratio |",
        "|---|---|---|---|---|---|---|---|", *rows]))


def drift(out: Path, model: str, threads: int, rounds: int) -> None:
    """The unpruned, smallest and two random cuts of `model` (float TFLite, 224 px) timed in
    turns `rounds` times: the spread of each cut's ratio to the unpruned file over all turns,
    against that of its place between the smallest and the unpruned file (which cancels a cost
    per op that a busy machine adds to every file alike); and, in the same rounds, each cut as
    the latency clock times it (`Clock.ratio`: in turns with the unpruned file, from the turns
    where that ran near its fastest)."""
    net = build(model).eval()
    _, space = lut_model_space(net)
    rng = np.random.default_rng(5)
    configs = {"unpruned": space.max(), "smallest": space.min(), "cut a": space.sample(rng), "cut b": space.sample(rng)}
    paths = {name: out / f"drift_{name.replace(' ', '_')}.tflite" for name in configs}
    for name, config in configs.items():
        Clock().export(prune(net, config, space, importance="first"), 224, paths[name])
    clock, fastest, ms, clocked, seconds = Clock(threads=threads), None, [], [], 0.0
    for _ in tqdm(range(rounds), desc="rounds", unit="round"):
        ms.append([r["median_ms"] for r in measure_in_turns(list(paths.values()), "auto", threads, 5, 100)])
        began = time.perf_counter()
        clocked.append([])
        for cut in ("cut a", "cut b"):
            timed = clock.ratio(paths[cut], paths["unpruned"], fastest)
            fastest = timed["fastest_ms"]
            clocked[-1].append(timed["ratio"])
        seconds += time.perf_counter() - began
    ms, clocked = np.array(ms), np.array(clocked)
    unpruned, smallest = ms[:, 0], ms[:, 1]
    cv = lambda x: f"{100 * x.std() / x.mean():.1f}%"  # noqa: E731
    u, s = np.median(unpruned), np.median(smallest)  # each round's time mapped back to a typical round's clock
    rows = [f"| {name} | {np.median(t / unpruned):.3f} | {cv(t / unpruned * u)} | "
            f"{cv(s + (t - smallest) / (unpruned - smallest) * (u - s))} | {np.median(c):.3f} | {cv(c)} |"
            for name, t, c in zip(("cut a", "cut b"), ms[:, 2:].T, clocked.T)]
    write_section(f"Latency clock drift ({threads} threads)", "\n".join([
        f"{model} at 224 px, float TFLite, {threads} threads: the unpruned file, the smallest config's and two random "
        f"cuts timed in turns of 10 invokes (2 of each left out, 100 a file), {rounds} rounds one after another; "
        "in each round, each cut timed once more by the latency clock (in turns with the unpruned file, from the turns "
        f"where that ran within {100 * SLACK:.0f}% of its fastest turn of the run, timed again up to 10 s until 4 "
        f"turns count: {seconds / rounds / 2:.1f} s a cut). Spread: the coefficient of variation over the rounds "
        "of each cut's time mapped to the median round's clock, by its median ratio to the unpruned file over all "
        "turns, by its place between the smallest and the unpruned file (affine), or by the clock's ratio; the "
        f"smallest file's own ratio over all turns spread by {cv(smallest / unpruned)}, the unpruned file's time by "
        f"{cv(unpruned)}.", "",
        "| file | median ratio, all turns | spread | affine spread | clock's median ratio | clock's spread |",
        "|---|---|---|---|---|---|", *rows]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_lut"))
    ap.add_argument("--table-only", action="store_true", help="build the table from the records already there")
    ap.add_argument("--build-time", action="store_true", help="only the build on one core against every core")
    ap.add_argument("--cells", help="only these cells, as MODEL:CLOCK,... (clocks: " + ", ".join(CLOCKS) + ")")
    ap.add_argument("--samples", type=int, help="whole models the latency model is fitted on, in place of the size's")
    ap.add_argument("--check", type=int, help="check configs a cell, in place of the size's")
    ap.add_argument("--label", help="write the table to a RESULTS section of its own, named with this label "
                    "(cells under OUT/SIZE-LABEL)")
    ap.add_argument("--noise", type=int, metavar="REPEATS", help="only the spread of repeated timings of one cut, "
                    "one after the other against in turns, REPEATS ratios each")
    ap.add_argument("--drift", type=int, metavar="ROUNDS", help="only how far cuts' timings move over ROUNDS rounds "
                    "of turns: as ratios over all turns, affine, and by the latency clock (--drift-model, --drift-threads)")
    ap.add_argument("--drift-model", default="torchvision:mobilenet_v3_large")
    ap.add_argument("--drift-threads", type=int, default=2)
    args = ap.parse_args()
    p = {**SIZES[args.size], **{k: getattr(args, k) for k in ("samples", "check") if getattr(args, k)}}
    if args.cells:
        p["cells"] = [tuple(c.rsplit(":", 1)) for c in args.cells.split(",")]
        unknown = [":".join(c) for c in p["cells"] if len(c) != 2 or c[1] not in CLOCKS]
        if unknown:
            ap.error(f"--cells: {', '.join(unknown)} names no clock; give MODEL:CLOCK with CLOCK one of "
                     f"{', '.join(CLOCKS)}")
    out = args.out / (f"{args.size}-{args.label}" if args.label else args.size)
    out.mkdir(parents=True, exist_ok=True)
    if args.build_time:
        return build_time(out, p["samples"])
    if args.noise:
        return noise(out, args.noise)
    if args.drift:
        return drift(out, args.drift_model, args.drift_threads, args.drift)
    rows = []
    for model, clock in p["cells"]:
        path = out / f"{model.replace(':', '_')}__{clock}.json"
        if args.table_only and not path.exists():
            continue
        r = cell(model, clock, p, out)
        c, tile = refit(model, r)
        star = "" if r.get("timing") == TIMING else "+" if "turns" in r.get("timing", "") else "*"
        built = r["check"]
        rows.append(f"| {model}{star} | {r['clock']['dtype']} {r['clock']['runtime']} | {r['clock']['threads']} | "
                    f"{r['unpruned_ms']:.2f} / {r['floor_ms']:.2f} | {len(r['fit']['samples'])} | {r['build_s']:.0f} s | "
                    f"{tile} | {c['within_10pct']:.0%} | {c['within_5pct']:.0%} | {c['mean_abs_error_pct']:.1f}% | "
                    f"{c['max_abs_error_pct']:.1f}% | {built['within_10pct']:.0%}, {built['within_5pct']:.0%} | "
                    f"{_retimed(c)} |")
    write_section(f"Latency model accuracy ({args.size})" + (f": {args.label}" if args.label else ""), "\n".join([
        f"Each model at 224 px ({'16 px: ' if args.size == 'quick' else ''}the latency model fitted on {p['samples']} whole models (the unpruned one, the "
        f"smallest, two uniform widths, random configs), exported and timed as a ratio to the unpruned file (this machine's speed drifts over minutes): since 2026-12-07 the two in turns of 10 invokes, 2 of each left out, from the turns where the unpruned file ran within {SLACK:.0%} of its fastest turn of the build (section 'Latency clock drift'); cells marked + took every turn (2026-12-06, section 'Latency timing noise'), cells marked * the lower of two sessions' medians of 50 runs, the unpruned file timed right after, or before that one session's median); then checked on "
        f"{p['check']} random configs it never saw, exported and timed the same way. Build time: sampling and "
        "fitting, on this machine. Every cell is scored with this version's fit, refitted on the cell's own timed "
        "samples (the timings are the record's; the fit is redone), so a change to the fit is judged on the same "
        "measurements. Tile: the channel tile the fit chose (channels, o = outputs rounded up, io = inputs too). "
        "nn-Meter's bar on mobile CPUs: 99% within +-10%. The per-layer table this "
        "replaced had 76% (TFLite) and 80% (ONNX Runtime) within +-10% on MobileNetV2 (section 'Latency table "
        "accuracy' below).", "",
        "| model | file | threads | unpruned / smallest (ms) | fitted on | build | tile | within +-10% | within +-5% | "
        "mean abs error | max abs error | as built: within +-10%, +-5% | re-timed: within +-5%, mean abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "As built: the same cell scored by the fit of the version that built it. Re-timed: each check file timed "
        "again right after, the same way; how far two timings of one file differ on this machine is the floor under "
        "any predictor's error ('-': cells run before this column existed)."]))


def refit(model: str, record: dict) -> tuple[dict, str]:
    """The record's check scored by this version's fit (and layer records) of its own samples, and the tile chosen;
    a record whose check kept no configs is scored as it was built."""
    pairs = record["check"]["pairs"]
    if not pairs or "config" not in pairs[0] or "retimed_ms" not in pairs[0]:
        return record["check"], "-"
    net = build(model, **({"num_classes": 21} if "--num-classes" in MODELS.get(model, []) else {}),
                input_size=record["input_size"])
    _, space = lut_model_space(net, record["space"]["divisor"], record["space"]["min_ratio"])
    samples = [(ChannelConfig(s["config"]), s["measured_ms"]) for s in record["fit"]["samples"]]
    # this version's layer records too: a kind of work it reads may not be in the record's
    base = {**{k: v for k, v in record.items() if k not in ("fit", "check")}, "layers": layer_records(net, space)}
    fitted = LatencyModel.fit(base, space, samples)
    scored = check_scores(fitted, [ChannelConfig(q["config"]) for q in pairs], [q["measured_ms"] for q in pairs],
                          [q["retimed_ms"] for q in pairs])
    return scored, tile_name(fitted.tile) if fitted.tile[0] > 1 else "none"


def _retimed(check: dict) -> str:
    if "retimed_within_5pct" not in check:
        return "-"
    return f"{check['retimed_within_5pct']:.0%}, {check['retimed_mean_abs_diff_pct']:.1f}%"


if __name__ == "__main__":
    main()
