"""How a budget spreads the cut over the channel groups: the config with the most MACs that
meets every budget given (MACs, parameters, predicted latency), by importance across groups
(global) or every group scaled alike (uniform). Under a latency budget the global cut removes
the channels that keep the least importance per predicted millisecond, as HALP does."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from compress.errors import CompressError
from compress.pruning.space import ChannelConfig, ChannelSpace
from compress.units import human

STRATEGIES = ("uniform", "global")


def allocate(space: ChannelSpace, budgets: Mapping[str, float], strategy: str = "global",
             scores: dict[str, np.ndarray] | None = None,
             latency: Callable[[Mapping[str, int]], float] | None = None) -> ChannelConfig:
    """The config with the most MACs within every budget of `budgets` ({"macs": N, "params":
    N, "latency": ms}; counts absolute, latency as `latency` predicts it).

    `uniform` scales every group by one multiplier; `global` removes, across all groups, the
    least important channels first (needs `scores`). Both then top up single groups while the
    budgets allow, so the result lands just under the tightest one.
    """
    if strategy not in STRATEGIES:
        raise CompressError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}.")
    unknown = set(budgets) - {"macs", "params", "latency"}
    if unknown or not budgets:
        raise CompressError(f"the direct path takes `macs`, `params` and `latency` budgets; got "
                            f"{sorted(budgets) or 'none'}.")
    if "latency" in budgets and latency is None:
        raise CompressError("a latency budget needs a latency model to predict it.")
    measure = {"macs": space.macs, "params": space.params, "latency": latency}
    for key, limit in budgets.items():
        floor = measure[key](space.min())
        if key == "latency" and limit < floor:
            raise CompressError(f"latency budget {limit:.3f} ms is below the {floor:.3f} ms predicted for the "
                                "smallest config this space allows; raise it, or lower the space's min ratio.")
        if key != "latency" and limit < floor:
            noun = "MAC" if key == "macs" else "parameter"
            raise CompressError(
                f"{noun} target {human(limit)} is below the smallest config this space allows ({human(floor)} "
                f"{'MACs' if key == 'macs' else 'params'}, every group at its minimum width; {floor - limit:,} "
                f"{'MACs' if key == 'macs' else 'params'} short). Raise the target to at least {human(floor)} or lower "
                "the space's min ratio.")

    def fits(config: Mapping[str, int]) -> bool:
        return all(measure[key](config) <= limit for key, limit in budgets.items())

    if fits(space.max()):
        return space.max()
    if strategy == "uniform":
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fits(space.uniform(mid)) else (lo, mid)
        config = space.uniform(lo) if lo > 0 and fits(space.uniform(lo)) else space.min()
        return _fill(space, config, fits, key=lambda g, w: w / g.max)
    if scores is None:
        raise CompressError("strategy 'global' needs channel importance scores.")
    ranked = {g.name: np.sort(scores[g.name])[::-1] for g in space.groups}  # most important first
    widths = dict(space.max())
    while not fits(widths):
        now = latency(widths) if "latency" in budgets else 0.0
        best, best_cost = None, np.inf
        for g in space.groups:
            w = widths[g.name]
            lower = [x for x in g.widths if x < w]
            # a kernel computes whole tiles of channels, so one step may save no time where two do
            for x in lower[-2:] if "latency" in budgets else lower[-1:]:
                cost = ranked[g.name][x:w].mean()
                if "latency" in budgets:  # importance per millisecond saved; a cut that saves none, last
                    saved = now - latency({**widths, g.name: x})
                    cost = cost * (w - x) / saved if saved > 0 else 1e30 * (1 + cost)
                if cost < best_cost:
                    best, best_cost = (g.name, x), cost
        widths[best[0]] = best[1]
    return _fill(space, ChannelConfig(widths), fits, key=lambda g, w: -ranked[g.name][w:_next_width(g, w)].mean())


def config_for_macs(space: ChannelSpace, target_macs: int, strategy: str = "uniform",
                    scores: dict[str, np.ndarray] | None = None) -> ChannelConfig:
    """The config with the most MACs not above `target_macs` (`allocate` with one budget)."""
    return allocate(space, {"macs": target_macs}, strategy, scores)


def _next_width(group, width: int) -> int:
    return min(x for x in group.widths if x > width)


def _fill(space: ChannelSpace, config: ChannelConfig, fits: Callable, key: Callable) -> ChannelConfig:
    """Grow single groups one step at a time (lowest `key` first) while every budget holds."""
    widths = dict(config)
    while True:
        options = [g for g in space.groups if widths[g.name] < g.max]
        options.sort(key=lambda g: key(g, widths[g.name]))
        for g in options:
            trial = {**widths, g.name: _next_width(g, widths[g.name])}
            if fits(trial):
                widths = trial
                break
        else:
            return ChannelConfig(widths)
