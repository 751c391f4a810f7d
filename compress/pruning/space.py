"""The channel space: which layer dimensions must share a width, and what widths they may take.

`ChannelSpace.from_model` reads the groups off torch-pruning's `DependencyGraph`, so it
works on any CNN the graph understands. It also records, once, each layer's dimensions
as affine functions of the group widths, which makes `macs(config)` and `params(config)`
exact closed-form counts that need no forward pass.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.errors import CompressError
from compress.pruning.closed_form import Bilinear, counters
from compress.pruning.graph import PRUNABLE, channel_cut, channel_slices, dependency_graph, fixed_layers, misread
from compress.units import human



class ChannelConfig(Mapping):
    """Group name -> width. Plain data: hashable, comparable, JSON round-trip."""

    def __init__(self, widths: Mapping[str, int]):
        self._w = {str(k): int(v) for k, v in widths.items()}

    def __getitem__(self, name: str) -> int:
        return self._w[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._w)

    def __len__(self) -> int:
        return len(self._w)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._w.items())))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self._w) == dict(other)

    def __repr__(self) -> str:
        return f"ChannelConfig({self._w})"

    def to_dict(self) -> dict[str, int]:
        return dict(self._w)

    def to_json(self) -> str:
        return json.dumps(self._w, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "ChannelConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CompressError(f"{source} is not valid JSON: {exc}. A channel config is a JSON "
                                'object mapping group names to widths, e.g. {"features.0.0": 24}.') from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]  # also accept a search/profile result that wraps it
        if not isinstance(data, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            raise CompressError(f"{source} must be a JSON object mapping group names to integer "
                                'widths, e.g. {"features.0.0": 24}.')
        return cls(data)

    @classmethod
    def load(cls, path: str | Path) -> "ChannelConfig":
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"channel config file '{path}' does not exist.")
        return cls.from_json(path.read_text(), source=f"'{path}'")


@dataclass(frozen=True)
class ChannelGroup:
    """Layer dimensions that must keep one width, e.g. a conv's output, its BN, the
    depthwise conv after it and the next conv's input."""

    name: str
    max: int
    widths: tuple[int, ...]
    members: tuple[str, ...]  # "module.name:out" / "module.name:in"
    # a grouped conv or GroupNorm among the members splits the channels into this many equal
    # slices; pruning removes the same positions from every slice, so widths are multiples of it
    slices: int = 1

    @property
    def min(self) -> int:
        return self.widths[0]

    def nearest(self, width: float) -> int:
        return min(self.widths, key=lambda w: (abs(w - width), w))


def make_divisible(value: float, divisor: int) -> int:
    """Round to the nearest multiple of `divisor`, never below it nor 10% under `value`
    (the rule torchvision's MobileNets use for width multipliers)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def _allowed_widths(full: int, divisor: int, min_ratio: float, ratios, slices: int = 1) -> tuple[int, ...]:
    """Multiples of `divisor` (of the slice count and the divisor together when a smaller width
    is left that way, else of the slice count alone: RegNet's 55 slices of 8 channels would
    otherwise allow no width but the full one)."""
    step = math.lcm(divisor, slices)
    if slices > 1 and step >= full:
        step = slices
    if ratios is not None:
        widths = {min(full, make_divisible(full * r, step)) for r in ratios}
    else:
        lo = min(full, max(step, math.ceil(full * min_ratio / step) * step))
        widths = set(range(lo, full + 1, step)) if full >= step else set()
    widths.add(full)
    return tuple(sorted(w for w in widths if 0 < w <= full and w % slices == 0))


class ChannelSpace:
    """The channel groups of one model at one input size, and their allowed widths."""

    def __init__(self, groups: list[ChannelGroup], macs_fn: Bilinear, params_fn: Bilinear,
                 input_size: tuple[int, ...], divisor: int, min_ratio: float, ratios):
        self.groups = groups
        self.by_name = {g.name: g for g in groups}
        self._macs = macs_fn
        self._params = params_fn
        self.input_size = tuple(input_size)
        self.divisor = divisor
        self.min_ratio = min_ratio
        self.ratios = None if ratios is None else tuple(ratios)
        self.held: dict[str, str] = {}  # layers whose channels stay as they are, and why
        self.held_channels = 0  # the channels of those groups

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, example_input: torch.Tensor, divisor: int = 8,
                   ratios=None, min_ratio: float = 0.25) -> "ChannelSpace":
        """Find the channel groups of `model` with torch-pruning's DependencyGraph.

        Allowed widths are the multiples of `divisor` from `min_ratio` of each group's
        width up to the full width, or, with `ratios`, those ratios rounded to `divisor`.
        The full width is always allowed, so the unpruned model is in the space.
        """
        if divisor < 1 or not 0 < min_ratio <= 1:
            raise CompressError(f"divisor must be >= 1 and min_ratio in (0, 1]; got {divisor}, {min_ratio}.")
        model = model.eval()
        graph = dependency_graph(model, example_input)
        names = {m: n for n, m in model.named_modules()}
        order = {n: i for i, n in enumerate(names.values())}

        raw = []  # (name, full width, [(module, 'out'|'in', n_idxs)], slices)
        held, held_channels = {}, 0  # group name -> why it keeps its full width; their channels
        cut_ops = set()  # the ops that hold groups, by id: a group on either side of one is held once
        for group in graph.get_all_groups(ignored_layers=fixed_layers(model, graph),
                                          root_module_types=PRUNABLE):
            items = [(item.dep.target.module, "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in",
                      item.idxs, item.dep.target) for item in group.items]
            members = [(m, k, len(i)) for m, k, i, _ in items if m in names]
            outs = [(len(i), order[names[m]], names[m]) for m, k, i, _ in items
                    if m in names and k == "out" and isinstance(m, PRUNABLE)]
            if not outs:
                continue
            # the group's channels are those of its narrowest layer: a layer concatenated with a
            # transform of itself (GhostNet) feeds each of its channels to two of the next layer's
            full, _, name = min(outs)
            op, cut = next(((node, why) for m, _, _, node in items if m not in names and (why := channel_cut(node))),
                           (None, None))
            if op is not None:
                if id(op) in cut_ops:
                    continue  # held already, as the other side of the same op (a group's search stops at it)
                cut_ops.add(id(op))
            cut = cut or next(filter(None, (misread(graph, m, k, i, full, names[m]) for m, k, i, _ in items
                                            if m in names)), None)
            slices = math.lcm(*(channel_slices(m) for m, _, _ in members))
            if cut or full % slices:
                held[name] = cut or f"its {full} channels do not split into the {slices} equal slices its grouped " \
                                    "convs and GroupNorms need"
                held_channels += full
                continue
            # parameters outside any layer that torch-pruning prunes with the group (a layer scale)
            loose = [(id(m), len(i)) for m, _, i, _ in items if isinstance(m, nn.Parameter)]
            raw.append((name, full, members, slices, loose))
        raw.sort(key=lambda r: order[r[0]])

        groups, dims_of = [], {}
        for gi, (name, full, members, slices, loose) in enumerate(raw):
            groups.append(ChannelGroup(
                name=name, max=full, widths=_allowed_widths(full, divisor, min_ratio, ratios, slices),
                members=tuple(sorted({f"{names[m]}:{k}" for m, k, _ in members}, key=lambda s: (
                    order[s.rsplit(':', 1)[0]], s))), slices=slices))
            for module, kind, n in members:
                dims_of.setdefault((module, kind), {})[gi] = (n, full)
            for key, n in loose:
                dims_of.setdefault((key, "out"), {})[gi] = (n, full)
        macs_fn, params_fn = counters(model, example_input, dims_of, len(groups))
        space = cls(groups, macs_fn, params_fn, tuple(example_input.shape[1:]), divisor, min_ratio, ratios)
        space.held = dict(sorted(held.items(), key=lambda kv: order[kv[0]]))
        space.held_channels = held_channels
        return space

    # ---- configs --------------------------------------------------------------------------
    def max(self) -> ChannelConfig:
        return ChannelConfig({g.name: g.max for g in self.groups})

    def min(self) -> ChannelConfig:
        return ChannelConfig({g.name: g.min for g in self.groups})

    def uniform(self, width_mult: float) -> ChannelConfig:
        """Every group at `width_mult` of its width, rounded as torchvision rounds widths."""
        if not 0 < width_mult <= 1:
            raise CompressError(f"a width multiplier must be in (0, 1], got {width_mult}.")
        return ChannelConfig({g.name: g.nearest(make_divisible(g.max * width_mult, self.divisor)
                                                 if g.max >= self.divisor else g.max)
                              for g in self.groups})

    def within(self, parent: "ChannelSpace") -> "ChannelSpace":
        """This space (a pruned model's) allowing only the widths its unpruned parent's space
        allows, so every config chosen here is also one of the parent's, which is what a
        checkpoint is rebuilt from."""
        if set(self.by_name) != set(parent.by_name):
            raise CompressError("the pruned model's channel groups differ from its unpruned architecture's: "
                                f"{sorted(set(self.by_name) ^ set(parent.by_name))[:5]}.")
        groups = [replace(g, widths=tuple(w for w in parent.by_name[g.name].widths if w <= g.max))
                  for g in self.groups]
        space = ChannelSpace(groups, self._macs, self._params, self.input_size, parent.divisor, parent.min_ratio,
                             parent.ratios)
        space.held, space.held_channels = self.held, self.held_channels
        return space

    def sample(self, rng: np.random.Generator) -> ChannelConfig:
        return ChannelConfig({g.name: int(rng.choice(g.widths)) for g in self.groups})

    def validate(self, config: Mapping[str, int]) -> ChannelConfig:
        """Check that `config` names every group once and uses allowed widths."""
        unknown = [k for k in config if k not in self.by_name]
        if unknown:
            import difflib
            hints = [f"'{k}'" + (f" (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(
                k, self.by_name, n=1)) else "") for k in unknown[:5]]
            raise CompressError(f"channel config names unknown group(s) {', '.join(hints)}; this "
                                f"space has {len(self.groups)} groups (`chansearch profile` lists them).")
        missing = [g.name for g in self.groups if g.name not in config]
        if missing:
            raise CompressError(f"channel config is missing group(s) {', '.join(missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                                + "; give a width for every group.")
        for g in self.groups:
            if config[g.name] not in g.widths:
                raise CompressError(
                    f"width {config[g.name]} is not allowed for group '{g.name}' (max {g.max}); "
                    f"allowed widths: {_show_widths(g.widths)}.")
        return ChannelConfig({g.name: int(config[g.name]) for g in self.groups})

    def vector(self, config: Mapping[str, int]) -> np.ndarray:
        return np.array([config[g.name] for g in self.groups], dtype=np.float64)

    # ---- cost -----------------------------------------------------------------------------
    def macs(self, config: Mapping[str, int]) -> int:
        """Conv + linear multiply-accumulates at the space's input size (batch 1)."""
        return int(self._macs(self.vector(config)))

    def params(self, config: Mapping[str, int]) -> int:
        return int(self._params(self.vector(config)))

    def macs_many(self, vectors: np.ndarray) -> np.ndarray:
        """MACs of many configs at once, one config per row of group widths."""
        return self._macs(np.asarray(vectors, dtype=np.float64))

    def params_many(self, vectors: np.ndarray) -> np.ndarray:
        return self._params(np.asarray(vectors, dtype=np.float64))

    def check_budget(self, key: str, limit: float | None, own: float | None = None) -> None:
        """Refuse a limit (`macs`, `params`, or `latency_ms` with the full model's predicted
        latency `own`) that no config can meet, or that the unpruned model already meets: a
        typo like 100G for 100M, or 150%, would otherwise prune nothing and say nothing."""
        if limit is None:
            return
        if key != "latency_ms":
            own = self.macs(self.max()) if key == "macs" else self.params(self.max())
            floor = self.macs(self.min()) if key == "macs" else self.params(self.min())
            if limit < floor:
                raise CompressError(
                    f"no config can meet {key} <= {human(limit)}: it is below the smallest config of this space, "
                    f"which has {human(floor)} {key} ({human(floor - limit)} over). Raise the budget to at least "
                    f"{human(floor)}, or build the space with a lower `min_width`." + (
                        f" {len(self.held)} channel group(s) stay at full width (the first: '{next(iter(self.held))}', "
                        f"{next(iter(self.held.values()))})." if self.held else ""))
        if own is not None and limit > own:
            figure = f"{own:.3g} ms (predicted)" if key == "latency_ms" else f"{human(own)} {key}"
            shown = f"{limit:g} ms" if key == "latency_ms" else human(limit)
            raise CompressError(f"the budget {key} <= {shown} is above the unpruned model's own {figure}: there is "
                                f"nothing to prune. Give a budget below it (a percentage like 50% is of the "
                                "unpruned model).")

    def settings(self) -> dict:
        """What `from_model` needs, besides the model, to rebuild this space."""
        return {"divisor": self.divisor, "min_ratio": self.min_ratio,
                "ratios": None if self.ratios is None else list(self.ratios)}


def _show_widths(widths) -> str:
    return ", ".join(map(str, widths)) if len(widths) <= 12 else (
        f"{', '.join(map(str, widths[:4]))}, ..., {', '.join(map(str, widths[-3:]))}")


def widths_of(model: nn.Module, space: ChannelSpace) -> ChannelConfig:
    """The widths a (pruned) model actually has, read off each group's defining layer."""
    out = {}
    for g in space.groups:
        m = model.get_submodule(g.name)
        out[g.name] = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    return ChannelConfig(out)
