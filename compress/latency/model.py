"""A latency model of one channel space on one clock: the time of a config predicted from the
work its layers do, each kind of work weighted by what it costs on that runtime.

    ms = overhead + sum over kinds and terms of weight * work(config)

The weights are fitted, non-negative, on whole models exported and timed at sampled configs
(relative error, so small and large configs count alike). Timing whole files, not layers
alone, keeps what the runtime does around each layer (fusion, layout changes, the adds and
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
from compress.latency.layers import FEATURES, features
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
        self.weights = np.array([record["fit"]["weights"][f] for f in FEATURES])
        self.overhead = record["fit"]["overhead_ms"]

    @classmethod
    def fit(cls, base: dict, space: ChannelSpace, samples: list[tuple[ChannelConfig, float]]) -> "LatencyModel":
        """Fit the weights to measured (config, ms) pairs; `base` holds the layers and identity."""
        X = np.array([features(base["layers"], c, space) for c, _ in samples])
        y = np.array([ms for _, ms in samples])
        scale = np.where(X.max(0) > 0, X.max(0), 1.0)
        A = np.hstack([X / scale, np.ones((len(X), 1))]) / y[:, None]  # relative error: rows divided by the time
        solution, _ = nnls(A, np.ones(len(y)))
        weights = dict(zip(FEATURES, (solution[:-1] / scale).tolist()))
        record = {**base, "fit": {"weights": weights, "overhead_ms": float(solution[-1]),
                                  "samples": [{"config": c.to_dict(), "measured_ms": ms} for c, ms in samples]}}
        return cls(record, space)

    def predict(self, config: Mapping[str, int]) -> float:
        """Predicted latency of `config` in ms."""
        return float(self.weights @ features(self.record["layers"], config, self.space) + self.overhead)

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
        model = cls(record, space)
        here = identity or model.clock().identity()
        differ = [f"{k}: {record['clock'].get(k)!r} there, {v!r} here" for k, v in here.items()
                  if record["clock"].get(k) != v]
        if differ:
            raise CompressError(f"latency model '{path}' was measured on another clock ({'; '.join(differ)}); its "
                                "times do not hold here. Build one on this machine with `chansearch lut` (or leave "
                                "out the file: prune builds and caches one).")
        return model
