"""Per-layer latency lookup table of a channel space on one runtime (as FBNet and
once-for-all build them), and the latency predictor the search's `latency_ms` budget uses.

Each conv / linear layer is exported alone and timed at a grid of input x output widths
(depthwise convs: a grid of widths); layers with the same shape share measurements. A
config's latency is predicted as a * (sum of its layers' interpolated latencies) + b, where
a and b are fitted on whole models measured at a few anchor configs: they absorb what
per-layer timing misses (activations, adds, pooling, the runtime's own overhead).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from compress.errors import CompressError
from compress.export.latency import measure
from compress.export.tflite import convert
from compress.pruning.prune import prune
from compress.pruning.space import ChannelConfig, ChannelSpace
from compress.pruning.graph import example_input
from compress.supernet.dynamic import Supernet

FORMAT = "compress.lut"
SUFFIX = {"tflite": ".tflite", "onnxruntime": ".onnx"}


def export_for_timing(module: nn.Module, example: torch.Tensor, path: Path, backend: str) -> None:
    """Write `module` in the backend's format, without parity checks (timing only)."""
    module = module.eval()
    if backend == "tflite":
        convert(module, (example,)).export(str(path))
    else:
        import warnings
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and ~20x faster for one layer
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=18)


class LatencyTable:
    def __init__(self, record: dict, space: ChannelSpace):
        self.record = record
        self.space = space
        names = [g.name for g in space.groups]
        missing = {p[0] for layer in record["layers"] for d in ("in", "out") for p in layer[d]["parts"]} - set(names)
        if missing or record["space_groups"] != names:
            raise CompressError("the latency table was measured for another channel space (its groups differ: "
                                f"{', '.join(sorted(missing)[:3]) or 'order or count'}); build one for this model "
                                "with `chansearch lut`.")
        self.a, self.b = record["fit"]["a"], record["fit"]["b"]

    @classmethod
    def load(cls, path: str | Path, space: ChannelSpace) -> "LatencyTable":
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise CompressError(f"latency table '{path}' does not exist; make one with `chansearch lut`.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CompressError(f"latency table '{path}' is not valid JSON ({exc}).") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise CompressError(f"'{path}' is not a latency table (made by `chansearch lut`).")
        return cls(record, space)

    def layer_sum(self, config: Mapping[str, int]) -> float:
        total = 0.0
        for layer in self.record["layers"]:
            cin, cout = _width(layer["in"], config, self.space), _width(layer["out"], config, self.space)
            total += _interpolate(layer, cin, cout)
        return total

    def predict(self, config: Mapping[str, int]) -> float:
        """Predicted latency of `config` in ms."""
        return self.a * self.layer_sum(config) + self.b


def _width(dim: dict, config: Mapping[str, int], space: ChannelSpace) -> int:
    return dim["full"] - sum(reps * (space.by_name[g].max - config[g]) for g, reps in dim["parts"])


def _interpolate(layer: dict, cin: float, cout: float) -> float:
    gi, go, ms = np.array(layer["grid_in"], float), np.array(layer["grid_out"], float), np.array(layer["ms"])
    row = np.array([np.interp(cin, gi, ms[:, j]) for j in range(len(go))]) if len(gi) > 1 else ms[0]
    return float(np.interp(cout, go, row)) if len(go) > 1 else float(row[0])


def _layers(model: nn.Module, space: ChannelSpace) -> list[dict]:
    """Every conv/linear layer: its shape at full width, the input map it sees, and how its
    input/output widths follow the group widths."""
    supernet = Supernet(copy.deepcopy(model), space)
    dims = supernet.layer_dims
    plain = supernet.plain_copy().eval()
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, tuple(i[0].shape[1:])))
             for n, m in plain.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        plain(example_input(space.input_size[-1], plain))
    for h in hooks:
        h.remove()
    layers = []
    for name, m in plain.named_modules():
        if name not in seen:
            continue
        conv = isinstance(m, nn.Conv2d)
        depthwise = conv and m.groups > 1 and m.groups == m.in_channels == m.out_channels

        def dim(kind, full):
            d = dims.get((name, kind))
            parts = [] if d is None else [[space.groups[g].name, len(idxs) // space.groups[g].max]
                                          for g, idxs, _ in d.parts]
            return {"full": full, "parts": parts}
        layers.append({
            "name": name, "type": "conv" if conv else "linear", "depthwise": depthwise,
            "input_shape": list(seen[name]),
            **({"kernel": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups} if conv else {}),
            # a depthwise conv's input channels are its output channels
            "in": dim("out" if depthwise else "in", m.in_channels if conv else m.in_features),
            "out": dim("out", m.out_channels if conv else m.out_features)})
    return layers


def _grid(dim: dict, space: ChannelSpace, points: int) -> list[int]:
    lo = _width(dim, space.min(), space)
    if lo == dim["full"] or points < 2:
        return [dim["full"]]
    step = space.divisor
    values = {int(min(dim["full"], max(lo, round(v / step) * step))) for v in np.linspace(lo, dim["full"], points)}
    return sorted(values | {lo, dim["full"]})


def _layer_module(layer: dict, cin: int, cout: int) -> tuple[nn.Module, torch.Tensor]:
    shape = layer["input_shape"]
    if layer["type"] == "linear":
        return nn.Linear(cin, cout), torch.randn(1, cin)
    groups = cin if layer["depthwise"] else 1
    conv = nn.Conv2d(cin, cout, layer["kernel"], layer["stride"], layer["padding"], layer["dilation"], groups)
    return conv, torch.randn(1, cin, *shape[1:])


def build_table(model: nn.Module, space: ChannelSpace, backend: str = "tflite", threads: int = 1,
                grid: int = 4, anchors: int = 6, runs: int = 30, warmup: int = 5, seed: int = 0,
                progress: bool = True) -> dict:
    """Measure every layer on the grid, then fit a, b on whole models at anchor configs."""
    if backend not in SUFFIX:
        raise CompressError(f"unknown backend '{backend}'; a latency table is measured on tflite or onnxruntime.")
    layers = _layers(model, space)
    timed: dict[tuple, float] = {}
    work = []
    for layer in layers:
        gi, go = _grid(layer["in"], space, grid), _grid(layer["out"], space, grid)
        if layer["depthwise"]:
            gi = go  # one width: its input channels are its output channels
        layer["grid_in"], layer["grid_out"] = gi, go
        for cin in gi:
            for cout in go:
                if layer["depthwise"] and cin != cout:
                    continue
                work.append((layer, cin, cout))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"layer{SUFFIX[backend]}"
        for layer, cin, cout in tqdm(work, desc=f"timing layers on {backend}", unit="layer", disable=not progress):
            key = (json.dumps({k: v for k, v in layer.items() if k in (
                "type", "depthwise", "input_shape", "kernel", "stride", "padding", "dilation")}), cin, cout)
            if key not in timed:
                module, example = _layer_module(layer, cin, cout)
                export_for_timing(module, example, path, backend)
                timed[key] = measure(path, backend, threads=threads, warmup=warmup, runs=runs)["median_ms"]
            layer.setdefault("_ms", {})[(cin, cout)] = timed[key]
    for layer in layers:
        ms = layer.pop("_ms")
        if layer["depthwise"]:  # one dimension: interpolate along the output width only
            layer["grid_in"] = [layer["grid_in"][-1]]
            layer["ms"] = [[ms[(w, w)] for w in layer["grid_out"]]]
        else:
            layer["ms"] = [[ms[(i, o)] for o in layer["grid_out"]] for i in layer["grid_in"]]
    record = {"format": FORMAT, "version": 1, "backend": backend, "threads": threads,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
              "input_size": space.input_size[-1], "space": space.settings(),
              "space_groups": [g.name for g in space.groups], "layers": layers, "unique_layers": len(timed),
              "fit": {"a": 1.0, "b": 0.0}}
    table = LatencyTable(record, space)
    rng = np.random.default_rng(seed)
    configs = [space.max(), space.min(), space.uniform(0.5)] + [space.sample(rng) for _ in range(max(0, anchors - 3))]
    measured = measure_configs(model, space, configs, backend, threads, runs, warmup, progress, "anchor models")
    sums = np.array([table.layer_sum(c) for c in configs])
    a, b = np.polyfit(sums, measured, 1) if len(configs) > 1 else (measured[0] / sums[0], 0.0)
    record["fit"] = {"a": float(a), "b": float(b), "anchors": [
        {"config": c.to_dict(), "measured_ms": m, "layer_sum_ms": s} for c, m, s in zip(configs, measured, sums)]}
    return record


def measure_configs(model: nn.Module, space: ChannelSpace, configs: list[ChannelConfig], backend: str,
                    threads: int, runs: int = 30, warmup: int = 5, progress: bool = False,
                    what: str = "models") -> list[float]:
    """Median latency (ms) of each config's pruned model, exported and timed for real."""
    out = []
    example = example_input(space.input_size[-1], model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"model{SUFFIX[backend]}"
        for config in tqdm(configs, desc=f"timing {what} on {backend}", unit="model", disable=not progress):
            net = prune(model, config, space, importance="first").eval()
            export_for_timing(net, example, path, backend)
            out.append(measure(path, backend, threads=threads, warmup=warmup, runs=runs)["median_ms"])
    return out


def check_table(model: nn.Module, space: ChannelSpace, record: dict, configs: int = 50, seed: int = 1,
                runs: int = 30, warmup: int = 5, progress: bool = True) -> dict:
    """Predicted vs measured latency of random configs: the share within +-10%."""
    table = LatencyTable(record, space)
    rng = np.random.default_rng(seed)
    sample = [space.sample(rng) for _ in range(configs)]
    measured = measure_configs(model, space, sample, record["backend"], record["threads"], runs, warmup, progress,
                               "check models")
    predicted = [table.predict(c) for c in sample]
    err = np.abs(np.array(predicted) / np.array(measured) - 1)
    return {"configs": configs, "within_10pct": float(np.mean(err <= 0.10)), "within_5pct": float(np.mean(err <= 0.05)),
            "mean_abs_error_pct": float(100 * err.mean()), "max_abs_error_pct": float(100 * err.max()),
            "pairs": [{"measured_ms": m, "predicted_ms": p} for m, p in zip(measured, predicted)]}


def latency_predictor(path: str | Path, space: ChannelSpace) -> Callable[[ChannelConfig], float]:
    return LatencyTable.load(path, space).predict
