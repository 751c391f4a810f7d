"""Building a latency model: export and time whole models at sampled configs on the clock and
fit; check one on random configs; and the per-machine cache `prune --latency` reads, keyed by
the channel space and the clock, so a model is measured once per machine."""
from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from compress.export.latency import SLACK
from compress.latency.clock import SUFFIX, TIMING, Clock
from compress.latency.layers import layer_records
from compress.latency.model import FORMAT, LatencyModel
from compress.latency.workers import export_all
from compress.pruning.prune import prune
from compress.pruning.space import ChannelConfig, ChannelSpace


@contextlib.contextmanager
def exported(clock: Clock, nets: list[nn.Module], input_size: int, what: str | None = None,
             folder: Path | None = None) -> Iterator[list[Path]]:
    """Each of `nets` written as `clock`'s file in a temporary folder (inside `folder` when
    given), all before the caller times any; `what` labels the progress bar."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        paths = [Path(tmp) / f"cut{i}{SUFFIX[clock.runtime]}" for i in range(len(nets))]
        export_all(clock, nets, input_size, paths, what and f"exporting {what}")
        yield paths


class BesideUnpruned:
    """Times cuts of a model as ratios to the unpruned file, the two taking turns every few
    invokes: a shared machine's speed drifts by several percent over minutes (the unpruned
    MobileNetV2 ran at 2.95 to 3.34 ms in one afternoon here) and jumps over seconds, which a
    ratio taken in turns cancels; turns where the unpruned file ran well above its fastest turn
    of the whole run are left out (`measure_beside`). Files are all exported before any is
    timed, so no conversion runs beside a timing."""

    def __init__(self, model: nn.Module, space: ChannelSpace, clock: Clock, folder: Path):
        self.model, self.space, self.clock, self.folder = model, space, clock, folder
        self.reference = folder / f"unpruned{SUFFIX[clock.runtime]}"
        clock.export(copy.deepcopy(model), space.input_size[-1], self.reference)  # export sets eval mode
        self.fastest_ms: float | None = None  # the unpruned file's fastest turn so far
        self.reference_ms: list[float] = []  # its time in each timing's counted turns
        self.time(self.reference)

    @property
    def unpruned_ms(self) -> float:
        """The unpruned file's time, which turns a ratio into ms: the median of its times in
        the timings so far, of those within SLACK of the fastest. Any one timing, the first
        included, can fall in a slow phase whole (a 2-thread MobileNetV2 build on a 2-core VM
        first timed it at 5.14 ms, an earlier one on the same VM at 3.48 ms)."""
        fast = min(self.reference_ms) * (1 + SLACK)
        return float(np.median([t for t in self.reference_ms if t <= fast]))

    def __call__(self, configs: list[ChannelConfig], repeats: int = 1, what: str | None = None) -> list[list[float]]:
        """Each config's cut timed `repeats` times, as ratios; `what` labels the progress bars."""
        return self.nets([prune(self.model, c, self.space, importance="first") for c in configs], repeats, what)

    def nets(self, nets: list[nn.Module], repeats: int = 1, what: str | None = None) -> list[list[float]]:
        """Each of `nets` (cuts of the model) timed `repeats` times beside the unpruned file, as
        ratios to it."""
        with exported(self.clock, nets, self.space.input_size[-1], what, self.folder) as paths:
            return [[self.time(p) for _ in range(repeats)]
                    for p in tqdm(paths, desc=f"timing {what} ({self.clock.describe()})", unit="model",
                                  disable=what is None)]

    def time(self, path: Path) -> float:
        timed = self.clock.ratio(path, self.reference, self.fastest_ms)
        self.fastest_ms = timed["fastest_ms"]
        self.reference_ms.append(timed["reference_ms"])
        return timed["ratio"]


def sample_configs(space: ChannelSpace, count: int, seed: int = 0) -> list[ChannelConfig]:
    """The smallest config, uniform widths, then random configs (the unpruned one is the
    reference every time is taken beside)."""
    rng = np.random.default_rng(seed)
    fixed = [space.min(), space.uniform(0.5), space.uniform(0.75)][:count]
    return fixed + [space.sample(rng) for _ in range(count - len(fixed))]


def build_latency_model(model: nn.Module, space: ChannelSpace, clock: Clock, samples: int = 24, seed: int = 0,
                        progress: bool = True, on_ends: Callable[[float, float], None] | None = None,
                        layers: list[dict] | None = None, check: int = 0) -> LatencyModel:
    """Time `samples` whole models of `space` on `clock` (the unpruned one included) and fit.
    The unpruned and smallest configs are timed first and given to `on_ends(unpruned_ms,
    floor_ms)`, so a budget no config can meet is refused before the rest is measured. With
    `check`, that many random configs the fit never saw are timed too (`record["check"]`)."""
    began = time.perf_counter()
    base = {"format": FORMAT, "version": 1, "clock": clock.identity(), "timing": TIMING,
            "input_size": space.input_size[-1],
            "space": space.settings(), "space_groups": [g.name for g in space.groups],
            "layers": layers or layer_records(model, space)}
    configs = sample_configs(space, max(samples - 1, 3), seed)
    with tempfile.TemporaryDirectory() as tmp:
        timer = BesideUnpruned(model, space, clock, Path(tmp))
        floor = timer(configs[:1])[0][0]
        if on_ends is not None:
            on_ends(timer.unpruned_ms, floor * timer.unpruned_ms)
        rest = [t[0] for t in timer(configs[1:], what="sampled models" if progress else None)]
        unpruned = timer.unpruned_ms  # one scale for every sample, from every timing's counted turns
        base.update(unpruned_ms=unpruned, floor_ms=floor * unpruned)
        samples = list(zip([space.max(), *configs], [unpruned * r for r in (1.0, floor, *rest)]))
        fitted = _retimed(LatencyModel.fit(base, space, samples), base, samples, timer, unpruned, progress)
        fitted.record.update(build_s=round(time.perf_counter() - began, 1),
                             built=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        if check:
            fitted.record["check"] = _check(fitted, timer, unpruned, check, progress)
    return fitted


def _retimed(fitted: LatencyModel, base: dict, samples: list[tuple[ChannelConfig, float]], timer: BesideUnpruned,
             unpruned_ms: float, progress: bool) -> LatencyModel:
    """The fit again after each suspect sample (`LatencyModel.suspects`) is timed twice more and
    keeps the median of its three times: on a shared machine a timing now and then jumps by
    20-60%, and at 2 threads two such samples of 24 bent the whole fit (benchmarks/RESULTS.md,
    "Latency model accuracy")."""
    suspects = fitted.suspects()
    if not suspects:
        return fitted
    again = unpruned_ms * np.array(timer([samples[i][0] for i in suspects], 2,
                                         "suspect samples again" if progress else None))
    retimed = []
    for i, times in zip(suspects, again):
        first = samples[i][1]
        samples[i] = (samples[i][0], float(np.median([first, *times])))
        retimed.append({"sample": i, "first_ms": first, "again_ms": times.tolist(), "kept_ms": samples[i][1]})
    if 1 in suspects:  # the smallest config: the floor a budget is refused under
        base = {**base, "floor_ms": samples[1][1]}
    refit = LatencyModel.fit(base, fitted.space, samples)
    refit.record["fit"]["retimed"] = retimed
    return refit


def _check(fitted: LatencyModel, timer: BesideUnpruned, unpruned_ms: float, configs: int, progress: bool,
           seed: int = 1) -> dict:
    """Predicted against measured latency on random configs the fit never saw; each file is
    timed a second time too, to show how far two timings of one file differ here (the floor
    under any prediction's error)."""
    rng = np.random.default_rng(seed)
    sample = [timer.space.sample(rng) for _ in range(configs)]
    timed = unpruned_ms * np.array(timer(sample, 2, "check models" if progress else None))
    return check_scores(fitted, sample, timed[:, 0].tolist(), timed[:, 1].tolist())


def check_scores(fitted: LatencyModel, configs: list[ChannelConfig], measured: list[float],
                 again: list[float]) -> dict:
    """How far `fitted` predicts each config's measured time, against how far its second
    timing (`again`) lies from the first."""
    predicted = np.array([fitted.predict(c) for c in configs])
    err, noise = np.abs(predicted / np.asarray(measured) - 1), np.abs(np.asarray(again) / np.asarray(measured) - 1)
    return {"configs": len(configs), "within_10pct": float(np.mean(err <= 0.10)),
            "within_5pct": float(np.mean(err <= 0.05)), "mean_abs_error_pct": float(100 * err.mean()),
            "max_abs_error_pct": float(100 * err.max()), "retimed_within_5pct": float(np.mean(noise <= 0.05)),
            "retimed_mean_abs_diff_pct": float(100 * noise.mean()),
            "pairs": [{"config": c.to_dict(), "measured_ms": m, "predicted_ms": p, "retimed_ms": a}
                      for c, m, p, a in zip(configs, measured, predicted.tolist(), again)]}


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress") / "latency"


def cached_latency_model(model: nn.Module, space: ChannelSpace, clock: Clock, samples: int = 24,
                         progress: bool = True, on_ends: Callable[[float, float], None] | None = None,
                         rebuild: bool = False, check: int = 0) -> LatencyModel:
    """The latency model of `space` on `clock` from this machine's cache, built and cached
    when there is none, or `rebuild`, or `check` (then scored on that many random configs; see
    build_latency_model). Keyed by the layers, the space, the clock's identity and `samples`:
    `prune --latency` and a search of the same space judge by the same model."""
    identity, layers = clock.identity(), layer_records(model, space)
    key = {"clock": identity, "space": space.settings(), "groups": [[g.name, g.max] for g in space.groups],
           "layers": layers, "samples": samples, "format": FORMAT}
    path = cache_dir() / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json")
    if path.is_file() and not (rebuild or check):
        fitted = LatencyModel.load(path, space, identity)
        fitted.from_cache = True
        if on_ends is not None:
            on_ends(fitted.unpruned_ms, fitted.floor_ms)
        return fitted
    fitted = build_latency_model(model, space, clock, samples, progress=progress, on_ends=on_ends, layers=layers,
                                 check=check)
    fitted.save(path)
    return fitted
