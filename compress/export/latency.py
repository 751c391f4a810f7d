"""Latency of an exported model: ONNX Runtime or LiteRT on this machine, or TFLite's
benchmark_model on an Android phone over adb; and the budget check a CI pipeline calls."""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compress.errors import CheckFailed, CompressError
from compress.export.onnx import session
from compress.export.litert import open_interpreter
from compress.logs import runtime

BACKENDS = ("auto", "onnxruntime", "tflite")
DEVICE_DIR = "/data/local/tmp"


def _backend(path: Path, backend: str) -> str:
    if backend not in BACKENDS:
        raise CompressError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}.")
    if backend != "auto":
        return backend
    by_suffix = {".onnx": "onnxruntime", ".tflite": "tflite"}
    if path.suffix not in by_suffix:
        raise CompressError(f"cannot tell the backend of '{path}' from its suffix; use .onnx or .tflite, "
                            "or name the `backend`.")
    return by_suffix[path.suffix]


def _input(shape, dtype, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]  # symbolic batch: 1
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _stats(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "p95_ms": float(np.percentile(ms, 95)), "min_ms": float(ms.min()), "mean_ms": float(ms.mean()),
            "std_ms": float(ms.std()), "runs": int(len(ms))}


def _runner(path: Path, backend: str, threads: int, seed: int) -> tuple[Callable[[], object], str]:
    """One single-image inference of the file on a fixed input, and the runtime's version."""
    if backend == "onnxruntime":
        ort = runtime("onnxruntime")
        try:
            sess = session(path, threads)
        except Exception as exc:
            raise CompressError(f"ONNX Runtime cannot load '{path}': {str(exc)[:300]}") from None
        meta = sess.get_inputs()[0]
        dtype = {"tensor(float)": np.float32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}[meta.type]
        feed = {meta.name: _input(meta.shape, dtype, seed)}
        return (lambda: sess.run(None, feed)), f"onnxruntime {ort.__version__}"
    litert_version = runtime("ai_edge_litert").__version__
    try:
        interpreter = open_interpreter(path, threads)
    except Exception as exc:
        raise CompressError(f"LiteRT cannot load '{path}': {str(exc)[:300]}") from None
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], _input(list(detail["shape"]), detail["dtype"], seed))
    return interpreter.invoke, f"ai-edge-litert {litert_version}"


def _opened(path: str | Path, backend: str, threads: int, runs: int, warmup: int, seed: int):
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"model file '{path}' does not exist.")
    if threads < 1 or runs < 1 or warmup < 0:
        raise CompressError(f"need threads >= 1, runs >= 1, warmup >= 0; got {threads}, {runs}, {warmup}.")
    backend = _backend(path, backend)
    call, version = _runner(path, backend, threads, seed)
    for _ in range(warmup):
        call()
    return call, version, backend


def measure(path: str | Path, backend: str = "auto", threads: int = 1, warmup: int = 10, runs: int = 100,
            seed: int = 0) -> dict:
    """Time single-image inference: one fixed input built once, `warmup` untimed runs, then
    perf_counter around each run/invoke call only."""
    call, version, backend = _opened(path, backend, threads, runs, warmup, seed)
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return _timing(path, backend, threads, warmup, times, version)


def _timing(path: str | Path, backend: str, threads: int, warmup: int, times_s: list[float], version: str) -> dict:
    return {"model": str(path), "backend": backend, "threads": threads, "warmup": warmup, **_stats(times_s),
            "runtime": version, "device": f"local ({platform.machine()}, {platform.processor() or 'cpu'})"}


def measure_in_turns(paths: list[str | Path], backend: str = "auto", threads: int = 1, warmup: int = 5,
                     runs: int = 100, block: int = 10, skip: int = 2) -> list[dict]:
    """Each file timed as `measure` times it, the files in turns of `block` invokes each, the
    first `skip` of a turn left out (the other files' weights fill the cache then); with each
    file's median in every turn (`turn_ms`). On a shared machine speed changes over seconds;
    taking turns every few milliseconds lets every file see the same machine: the ratio of two
    files timed one after the other spread by 2-6% (std) on a 2-core VM, in turns by 1.6-2.4%
    (benchmarks/RESULTS.md, "Latency timing noise")."""
    opened = [_opened(p, backend, threads, runs, warmup, 0) for p in paths]
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(max(1, -(-runs // (block - skip)))):
        for (call, _, _), kept in zip(opened, times):
            for i in range(block):
                began = time.perf_counter()
                call()
                if i >= skip:
                    kept.append(time.perf_counter() - began)
    return [_timing(path, chosen, threads, warmup, kept, version) | {
        "in_turns_with": len(paths) - 1, "turn_ms": (1e3 * np.median(np.reshape(kept, (-1, block - skip)), 1)).tolist()}
        for path, (_, version, chosen), kept in zip(paths, opened, times)]


SLACK = 0.15  # a turn counts when the reference ran within this share of its fastest turn


def measure_beside(path: str | Path, reference: str | Path, threads: int = 1, warmup: int = 5, runs: int = 100,
                   fastest_ms: float | None = None, min_turns: int = 4, patience_s: float = 10.0) -> dict:
    """`path`'s and `reference`'s times taken in turns (`measure_in_turns`), from the turns where
    the reference ran within SLACK of its fastest turn (this call's, or `fastest_ms` when that
    is lower): the medians of those turns (`ms`, `reference_ms`), how many turns were timed and
    kept, and the reference's fastest turn. Timed again, up to `patience_s` seconds, until
    `min_turns` are kept. Why: on a 2-core VM at 2 threads the machine switches for seconds at a
    time into a phase where every file runs slower, each by its own factor (the unpruned
    MobileNetV3-Large 1.45x, its smallest cut 2x), so a ratio taken there is off by up to 40%;
    within the fast phase, ratios spread by 1.5-2% (benchmarks/RESULTS.md, "Latency clock
    drift"). A busy machine only ever slows a file, so its fastest turns are the machine as it
    is when nothing else runs."""
    began, turns = time.perf_counter(), []
    while True:
        mine, theirs = measure_in_turns([path, reference], "auto", threads, warmup, runs)
        turns += zip(mine["turn_ms"], theirs["turn_ms"])
        fastest = min([fastest_ms or np.inf, *(r for _, r in turns)])
        kept = [(m, r) for m, r in turns if r <= fastest * (1 + SLACK)]
        if len(kept) >= min_turns or time.perf_counter() - began > patience_s:
            break
    if not kept:  # the reference never came near the fastest turn known: the machine is slower now
        kept = [(m, r) for m, r in turns if r <= min(r for _, r in turns) * (1 + SLACK)]
    ms, reference_ms = np.median(kept, 0)
    return {"ms": float(ms), "reference_ms": float(reference_ms), "turns": len(turns), "kept": len(kept),
            "fastest_ms": float(fastest)}


# ---- Android over adb ---------------------------------------------------------------------
_DETAIL = re.compile(r"count=(\d+) first=\S+ curr=\S+ min=(\S+) max=(\S+) avg=(\S+) std=(\S+)"
                     r"(?: p5=(\S+) median=(\S+) p95=(\S+))?")
_SUMMARY = re.compile(r"Inference timings in us: Init: (\S+), First inference: (\S+), "
                      r"Warmup \(avg\): (\S+), Inference \(avg\): (\S+)")


def parse_benchmark_model(text: str) -> dict:
    """Read TFLite benchmark_model's output: the last `count=... min=... avg=... std=...
    [p5= median= p95=]` line (the timed runs; the first is warm-up) and the `Inference
    timings in us` summary. Times in ms. Older builds print no percentiles: then median
    falls back to the average and p95 is None; benchmark_model never prints p90."""
    details = _DETAIL.findall(text)
    summary = _SUMMARY.search(text)
    if not details or not summary:
        raise CompressError("benchmark_model's output has no timing lines ('count=... avg=...' and "
                            "'Inference timings in us: ...'); it printed:\n" + text.strip()[-800:])
    count, lo, hi, avg, std, _p5, median, p95 = details[-1]
    us = lambda s: float(s) / 1e3  # noqa: E731 (microseconds -> ms)
    return {"median_ms": us(median) if median else us(summary.group(4)), "p90_ms": None,
            "p95_ms": us(p95) if p95 else None, "min_ms": us(lo), "max_ms": us(hi), "mean_ms": us(summary.group(4)),
            "std_ms": us(std), "runs": int(count), "init_ms": us(summary.group(1)),
            "first_ms": us(summary.group(2)), "median_is_average": not median}


def adb_commands(path: str | Path, serial: str | None = None, threads: int = 1, warmup: int = 10,
                 runs: int = 100, binary: str = f"{DEVICE_DIR}/benchmark_model", use_xnnpack: bool = True,
                 taskset: str | None = None) -> list[list[str]]:
    """The adb calls: push the model, then run benchmark_model on it (optionally pinned
    to the CPUs of a `taskset` mask, e.g. f0 for the big cores)."""
    adb = ["adb"] + (["-s", serial] if serial else [])
    remote = f"{DEVICE_DIR}/{Path(path).name}"
    run = ([] if not taskset else ["taskset", taskset]) + [
        binary, f"--graph={remote}", f"--num_threads={threads}", f"--use_xnnpack={str(use_xnnpack).lower()}",
        f"--warmup_runs={warmup}", f"--num_runs={runs}"]
    return [adb + ["push", str(path), remote], adb + ["shell", " ".join(run)]]


def measure_adb(path: str | Path, serial: str | None = None, **options) -> dict:
    path = Path(path)
    if not path.is_file() or path.suffix != ".tflite":
        raise CompressError(f"'{path}' is not a .tflite file; on a device, benchmark_model runs TFLite models.")
    if shutil.which("adb") is None:
        raise CompressError("adb is not on PATH: install Android platform-tools and connect the phone "
                            "(USB debugging on), or use --device local.")
    devices = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=60).stdout
    attached = [line.split()[0] for line in devices.splitlines()[1:] if line.strip().endswith("device")]
    if not attached or (serial and serial not in attached):
        raise CompressError(f"no Android device {'with serial ' + serial + ' ' if serial else ''}is connected "
                            f"(adb devices lists: {', '.join(attached) or 'none'}).")
    output = ""
    for command in adb_commands(path, serial, **options):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise CompressError(f"`{' '.join(command)}` failed ({done.returncode}): {output.strip()[-600:]}")
    result = parse_benchmark_model(output)
    return {"model": str(path), "backend": "tflite", "threads": options.get("threads", 1), **result,
            "runtime": "benchmark_model", "device": f"adb:{serial or attached[0]}"}


def check_budget(result: dict, budget_ms: float) -> None:
    """Raise CheckFailed (exit code 3) with one line when the median is over budget."""
    if result["median_ms"] > budget_ms:
        raise CheckFailed(f"latency over budget: {result['model']} on {result['backend']} with "
                          f"{result['threads']} thread(s): median {result['median_ms']:.3f} ms > budget "
                          f"{budget_ms:g} ms (+{result['median_ms'] - budget_ms:.3f} ms).")
