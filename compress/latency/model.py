"""A latency model of one channel space on one clock: the time of a config predicted from the
work its layers do, each kind of work weighted by what it costs on that runtime.

    ms = overhead + sum over kinds and terms of weight * work(config)

The weights are fitted, non-negative, on whole models exported and timed at sampled configs
(relative error, so small and large configs count alike). The kernels' channel tile (`TILES`
in layers.py) is the one whose fit predicts each sample best from the others (leave-one-out):
on the measured MobileNetV2, MobileNetV3-Large and ResNet-50 samples it was 16 or 32, and it
took the share of unseen configs predicted within +-5% from 63% to 70% (MobileNetV2, TFLite),
53% to 73% (MobileNetV3-Large) and 90% to 97% (ResNet-50) (benchmarks/RESULTS.md). Timing
whole files, not layers alone, keeps what the runtime does around each layer (fusion, layout changes, the adds and
pools, its fixed overhead) in the fit; on MobileNetV2 this predicted random configs better
than a per-layer table at a tenth of its build time (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from compress.errors import CompressError
from compress.files import atomic_write_json
from compress.latency.clock import Clock
from compress.latency.layers import FEATURES, TILES, features, tile_name
from compress.pruning.space import ChannelConfig, ChannelSpace

FORMAT = "compress.latency-model"


class LatencyModel:
    def __init__(self, record: dict, space: ChannelSpace):
        names = [g.name for g in space.groups]
        missing = {p[0] for layer in record["layers"] for d in ("in", "out") for p in layer[d]["parts"]} - set(names)
        if missing or record["space_groups"] != names:
            raise CompressError("the latency model was measured for another channel space (its groups differ: "
                                f"{', '.join(sorted(missing)[:3]) or 'order or count'}); build one for this model "
                                "with `chansearch lut`.")
        self.record, self.space = record, space
        self.from_cache = False  # set by the cache that handed it out
        self.weights = np.array([record["fit"]["weights"][f] for f in FEATURES])
        self.overhead = record["fit"]["overhead_ms"]
        self.tile = tuple(record["fit"]["tile"])

    @classmethod
    def fit(cls, base: dict, space: ChannelSpace, samples: list[tuple[ChannelConfig, float]]) -> "LatencyModel":
        """Fit the weights to measured (config, ms) pairs, at the tile that predicts each pair
        best from the others; `base` holds the layers and identity."""
        y = np.array([ms for _, ms in samples])
        work = {tile: np.array([features(base["layers"], c, space, tile) for c, _ in samples]) for tile in TILES}
        residuals = {tile: left_out_residuals(X, y) for tile, X in work.items()}
        loo = {tile: float(np.mean(np.abs(r))) for tile, r in residuals.items()}
        best = min(loo.values())
        tile = next(t for t in TILES if loo[t] <= 1.01 * best + 1e-9)  # within 1%, the smaller tile (first in TILES)
        weights, overhead = _nnls_relative(work[tile], y)
        record = {**base, "fit": {"weights": dict(zip(FEATURES, weights.tolist())), "overhead_ms": overhead,
                                  "tile": list(tile), "left_out_error": {tile_name(t): round(e, 5) for t, e in loo.items()},
                                  "samples": [{"config": c.to_dict(), "measured_ms": ms, "left_out_error": float(r)}
                                              for (c, ms), r in zip(samples, residuals[tile])]}}
        return cls(record, space)

    def suspects(self) -> list[int]:
        """The samples the others predict far worse than they predict each other (beyond three
        robust standard deviations of the left-out errors, and beyond 5%): timings a busy
        machine spoiled, worth taking again. The first sample, the unpruned file every time is a
        ratio to, is never one."""
        samples = self.record["fit"]["samples"]
        residuals = np.array([s["left_out_error"] for s in samples])
        spread = 1.4826 * np.median(np.abs(residuals))
        return [i for i in range(1, len(samples)) if abs(residuals[i]) > max(3 * spread, 0.05)]

    def predict(self, config: Mapping[str, int]) -> float:
        """Predicted latency of `config` in ms."""
        return float(self.weights @ features(self.record["layers"], config, self.space, self.tile) + self.overhead)

    @property
    def unpruned_ms(self) -> float:
        """The unpruned model's measured time (what `--latency 60%` is a share of)."""
        return self.record["unpruned_ms"]

    @property
    def floor_ms(self) -> float:
        """The measured time of the smallest config the space allows."""
        return self.record["floor_ms"]

    def clock(self) -> Clock:
        """The clock this model was measured on."""
        c = self.record["clock"]
        device = c["machine"] if str(c["machine"]).startswith("adb") else "local"
        return Clock(c["runtime"], c["threads"], c["dtype"] == "int8", device)

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.record)

    @classmethod
    def load(cls, path: str | Path, space: ChannelSpace, identity: dict | None = None) -> "LatencyModel":
        """Read a model; one measured on another machine or runtime version than this one's (or,
        with `identity`, on another clock than that) is refused."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise CompressError(f"latency model '{path}' does not exist; make one with `chansearch lut`.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CompressError(f"latency model '{path}' is not valid JSON ({exc}).") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise CompressError(f"'{path}' is not a latency model (made by `chansearch lut` of this version).")
        if (set(record["fit"].get("weights", ())) != set(FEATURES) or "tile" not in record["fit"]) \
                and record["space_groups"] == [g.name for g in space.groups]:
            # cached before the tile or a kind of work was fitted: refit its own samples
            samples = [(ChannelConfig(s["config"]), s["measured_ms"]) for s in record["fit"]["samples"]]
            record = cls.fit({k: v for k, v in record.items() if k != "fit"}, space, samples).record
        model = cls(record, space)
        here = identity or model.clock().identity()
        differ = [f"{k}: {record['clock'].get(k)!r} there, {v!r} here" for k, v in here.items()
                  if record["clock"].get(k) != v]
        if differ:
            raise CompressError(f"latency model '{path}' was measured on another clock ({'; '.join(differ)}); its "
                                "times do not hold here. Build one on this machine with `chansearch lut` (or leave "
                                "out the file: prune builds and caches one).")
        return model


def _nnls_relative(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative weights and overhead minimising the relative error of X @ w + overhead."""
    scale = np.where(X.max(0) > 0, X.max(0), 1.0)
    A = np.hstack([X / scale, np.ones((len(X), 1))]) / y[:, None]  # rows divided by the time
    solution, _ = nnls(A, np.ones(len(y)))
    return solution[:-1] / scale, float(solution[-1])


def left_out_residuals(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The relative error predicting each sample from a fit on the others."""
    residuals = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        w, overhead = _nnls_relative(X[keep], y[keep])
        residuals.append((X[i] @ w + overhead) / y[i] - 1)
    return np.array(residuals)
