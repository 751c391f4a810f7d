"""Budgets a candidate must meet: MACs, parameters, predicted latency."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from compress.errors import CompressError
from compress.latency.model import LatencyModel
from compress.settings import Target
from compress.pruning.space import ChannelConfig, ChannelSpace
from compress.units import human, parse_count, parse_latency


@dataclass(frozen=True)
class Budget:
    """Upper limits; None means no limit on that quantity."""

    macs: int | None = None
    params: int | None = None
    latency_ms: float | None = None

    def label(self) -> str:
        parts = [f"macs<={human(self.macs)}" if self.macs else "",
                 f"params<={human(self.params)}" if self.params else "",
                 f"latency<={self.latency_ms:g}ms" if self.latency_ms else ""]
        return ",".join(p for p in parts if p) or "none"

    def to_dict(self) -> dict:
        return {"macs": self.macs, "params": self.params, "latency_ms": self.latency_ms}

    def violations(self, cost: Mapping) -> list[str]:
        out = []
        for key, limit in (("macs", self.macs), ("params", self.params), ("latency_ms", self.latency_ms)):
            if limit is not None and cost.get(key) is not None and cost[key] > limit:
                out.append(f"{key} {cost[key]:,.4g} > {limit:,.4g}")
        return out


def targets_from_lists(macs: str | None = None, params: str | None = None,
                       latency: str | None = None) -> list[Target]:
    """Targets from comma lists (`--macs 150M,100M --params 2M`): one target per value, each
    also holding the other lists' limits (a single value applies to every target; lists
    must have equal lengths; '-' leaves that quantity unlimited for that target)."""
    lists = {"macs": _split(macs), "params": _split(params), "latency": _split(latency)}
    n = max(len(v) for v in lists.values())
    if n == 0:
        raise CompressError("give at least one budget: `macs` (e.g. 150M,100M or 50%), `params` or `latency`.")
    for key, values in lists.items():
        if len(values) not in (0, 1, n):
            raise CompressError(f"`{key}` has {len(values)} values but another budget list has "
                                f"{n}; give one value (for all targets) or {n}.")
    targets = []
    for i in range(n):
        values = {k: (v[i] if len(v) == n else v[0]) for k, v in lists.items() if v}
        values = {k: v for k, v in values.items() if v != "-"}
        if not values:
            raise CompressError("every target needs at least one limit; '-' in every list leaves one unlimited.")
        try:
            targets.append(Target(**values))
        except ValidationError as exc:
            raise CompressError("; ".join(f"`{'.'.join(map(str, e['loc'])) or 'target'}`: "
                                          f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()) + ".") from None
    return targets


def budgets_for(space: ChannelSpace, targets: list[Target], latency: LatencyModel | None = None) -> list[Budget]:
    """Each target as absolute limits in this space (percentages are of its full model, a
    latency share of its measured time in the `latency` model); a limit no config of the space
    can meet, or one the unpruned model already meets, is an error naming the figure to
    compare with."""
    if not targets:
        raise CompressError("give at least one budget: `macs` (e.g. 150M,100M or 50%), `params` or `latency`.")
    full = space.max()
    budgets = [Budget(macs=None if t.macs is None else parse_count(t.macs, "MAC count", space.macs(full)),
                      params=None if t.params is None else parse_count(t.params, "parameter count", space.params(full)),
                      latency_ms=None if t.latency is None or latency is None else
                      parse_latency(t.latency, latency.unpruned_ms)) for t in targets]
    for b in budgets:
        space.check_budget("macs", b.macs)
        space.check_budget("params", b.params)
        if b.latency_ms is not None:
            space.check_budget("latency_ms", b.latency_ms, latency.predict(space.max()))
    return budgets


def parse_budgets(space: ChannelSpace, macs: str | None = None, params: str | None = None) -> list[Budget]:
    """MAC and parameter budgets from the command line's comma lists."""
    return budgets_for(space, targets_from_lists(macs, params))


def _split(text: str | None) -> list[str]:
    return [] if text is None else [t.strip() for t in str(text).split(",") if t.strip()]


class CandidateSampler:
    """Random configs under a budget. A per-candidate scale s ~ U(min ratio, 1) sets each
    group near s of its width (with per-group noise), so tight budgets are reached as
    often as loose ones; MACs and params are screened in batches, analytically."""

    def __init__(self, space: ChannelSpace, budget: Budget, latency: Callable[[ChannelConfig], float] | None = None):
        self.space, self.budget, self.latency = space, budget, latency
        self.widths = [np.array(g.widths) for g in space.groups]
        self.max = np.array([g.max for g in space.groups], dtype=np.float64)

    def feasible(self, config: ChannelConfig) -> bool:
        cost = {"macs": self.space.macs(config), "params": self.space.params(config)}
        if self.budget.latency_ms is not None and self.latency is not None:
            cost["latency_ms"] = self.latency(config)
        return not self.budget.violations(cost)

    def _snap(self, targets: np.ndarray) -> np.ndarray:
        out = np.empty_like(targets)
        for j, w in enumerate(self.widths):
            out[:, j] = w[np.abs(w[None, :] - targets[:, j:j + 1]).argmin(1)]
        return out

    def draw(self, rng: np.random.Generator, count: int, max_tries: int = 200) -> list[ChannelConfig]:
        found: list[ChannelConfig] = []
        for _ in range(max_tries):
            scale = rng.uniform(self.space.min_ratio, 1.0, size=(256, 1))
            ratios = np.clip(scale + rng.normal(0, 0.15, size=(256, len(self.max))), 0, 1)
            vectors = self._snap(ratios * self.max)
            ok = np.ones(len(vectors), dtype=bool)
            if self.budget.macs is not None:
                ok &= self.space.macs_many(vectors) <= self.budget.macs
            if self.budget.params is not None:
                ok &= self.space.params_many(vectors) <= self.budget.params
            for v in vectors[ok]:
                config = ChannelConfig({g.name: int(w) for g, w in zip(self.space.groups, v)})
                if self.budget.latency_ms is None or self.feasible(config):
                    found.append(config)
                    if len(found) == count:
                        return found
        raise CompressError(f"found only {len(found)} of {count} random configs within {self.budget.label()} "
                            f"after {max_tries * 256:,} draws; the budget is too tight for this space. Raise it.")
