"""Building a latency model: export and time whole models at sampled configs on the clock and
fit; check one on random configs; and the per-machine cache `prune --latency` reads, keyed by
the channel space and the clock, so a model is measured once per machine."""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from compress.latency.clock import TIMING, Clock
from compress.latency.layers import layer_records
from compress.latency.model import FORMAT, LatencyModel
from compress.pruning.prune import prune
from compress.pruning.space import ChannelConfig, ChannelSpace


def time_configs(model: nn.Module, space: ChannelSpace, configs: list[ChannelConfig], clock: Clock,
                 progress: bool = False, what: str = "models") -> list[float]:
    """Measured latency (ms) of each config's pruned model on `clock`."""
    return [clock.time(prune(model, c, space, importance="first"), space.input_size[-1])
            for c in tqdm(configs, desc=f"timing {what} ({clock.describe()})", unit="model", disable=not progress)]


def sample_configs(space: ChannelSpace, count: int, seed: int = 0) -> list[ChannelConfig]:
    """The unpruned and smallest configs, uniform widths between, then random configs."""
    rng = np.random.default_rng(seed)
    fixed = [space.max(), space.min(), space.uniform(0.5), space.uniform(0.75)][:count]
    return fixed + [space.sample(rng) for _ in range(count - len(fixed))]


def build_latency_model(model: nn.Module, space: ChannelSpace, clock: Clock, samples: int = 24, seed: int = 0,
                        progress: bool = True, on_ends: Callable[[float, float], None] | None = None,
                        layers: list[dict] | None = None) -> LatencyModel:
    """Time `samples` whole models of `space` on `clock` and fit. The unpruned and smallest
    configs are timed first and given to `on_ends(unpruned_ms, floor_ms)`, so a budget no
    config can meet is refused before the rest is measured."""
    began = time.perf_counter()
    base = {"format": FORMAT, "version": 1, "clock": clock.identity(), "timing": TIMING,
            "input_size": space.input_size[-1],
            "space": space.settings(), "space_groups": [g.name for g in space.groups],
            "layers": layers or layer_records(model, space)}
    configs = sample_configs(space, max(samples, 4), seed)
    ends = time_configs(model, space, configs[:2], clock)
    base.update(unpruned_ms=ends[0], floor_ms=ends[1])
    if on_ends is not None:
        on_ends(*ends)
    rest = time_configs(model, space, configs[2:], clock, progress, "sampled models")
    fitted = LatencyModel.fit(base, space, list(zip(configs, ends + rest)))
    fitted.record["build_s"] = round(time.perf_counter() - began, 1)
    return fitted


def check_latency_model(model: nn.Module, space: ChannelSpace, fitted: LatencyModel, clock: Clock, configs: int = 50,
                        seed: int = 1, progress: bool = True) -> dict:
    """Predicted against measured latency on random configs the fit never saw; each file is
    timed a second time too, to show how far the machine itself lets two timings of one file
    differ (the floor under any prediction's error)."""
    rng = np.random.default_rng(seed)
    sample = [space.sample(rng) for _ in range(configs)]
    timed = np.array([clock.times(prune(model, c, space, importance="first"), space.input_size[-1], 4)
                      for c in tqdm(sample, desc=f"timing check models ({clock.describe()})", unit="model",
                                    disable=not progress)])
    measured, again = timed[:, :2].min(1), timed[:, 2:].min(1)  # as `Clock.time` times, twice
    predicted = np.array([fitted.predict(c) for c in sample])
    err, noise = np.abs(predicted / measured - 1), np.abs(again / measured - 1)
    return {"configs": configs, "within_10pct": float(np.mean(err <= 0.10)), "within_5pct": float(np.mean(err <= 0.05)),
            "mean_abs_error_pct": float(100 * err.mean()), "max_abs_error_pct": float(100 * err.max()),
            "retimed_within_5pct": float(np.mean(noise <= 0.05)), "retimed_mean_abs_diff_pct": float(100 * noise.mean()),
            "pairs": [{"config": c.to_dict(), "measured_ms": m, "predicted_ms": p, "retimed_ms": a}
                      for c, m, p, a in zip(sample, measured.tolist(), predicted.tolist(), again.tolist())]}


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress") / "latency"


def cached_latency_model(model: nn.Module, space: ChannelSpace, clock: Clock, samples: int = 24,
                         progress: bool = True, on_ends: Callable[[float, float], None] | None = None
                         ) -> LatencyModel:
    """The latency model of `space` on `clock` from this machine's cache, built and cached
    when there is none (keyed by the layers, the space, the clock's identity and `samples`)."""
    identity, layers = clock.identity(), layer_records(model, space)
    key = {"clock": identity, "space": space.settings(), "groups": [[g.name, g.max] for g in space.groups],
           "layers": layers, "samples": samples, "format": FORMAT}
    path = cache_dir() / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json")
    if path.is_file():
        fitted = LatencyModel.load(path, space, identity)
        if on_ends is not None:
            on_ends(fitted.unpruned_ms, fitted.floor_ms)
        return fitted
    fitted = build_latency_model(model, space, clock, samples, progress=progress, on_ends=on_ends, layers=layers)
    fitted.save(path)
    return fitted
