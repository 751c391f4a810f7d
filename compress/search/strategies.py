"""Search strategies over a channel space, sharing one interface: each takes the
Evaluator, a budget and a seeded generator, and returns the scored candidates it looked at
(best first). Evolution and random follow MetaPruning; greedy follows AutoSlim."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from compress.errors import CompressError
from compress.search.constraints import Budget, CandidateSampler
from compress.search.evaluator import Evaluator
from compress.pruning.space import ChannelConfig, ChannelSpace

Progress = Callable[[str], None]


def _rank(entries: list[dict]) -> list[dict]:
    """Best accuracy first; ties go to fewer MACs, then to the earlier candidate."""
    unique = list({e["config"]: e for e in reversed(entries)}.values())[::-1]
    return sorted(unique, key=lambda e: (-e["top1"], e["macs"]))


def random_search(evaluator: Evaluator, budget: Budget, rng: np.random.Generator, samples: int = 1000,
                  progress: Progress | None = None) -> list[dict]:
    """`samples` random configs within budget, all scored (the baseline every paper uses)."""
    configs = CandidateSampler(evaluator.space, budget, evaluator.latency).draw(rng, samples)
    scored = []
    for start in range(0, len(configs), 50):  # in chunks, so the state file follows progress
        scored += evaluator.score_many(configs[start:start + 50], progress=True)
        if progress:
            progress(f"random {budget.label()}: {len(scored)}/{samples} scored, best top-1 "
                     f"{_rank(scored)[0]['top1']:.2%}")
    return _rank(scored)


def evolution(evaluator: Evaluator, budget: Budget, rng: np.random.Generator, population: int = 50,
              parents: int = 10, mutations: int = 25, crossovers: int = 25, iterations: int = 20,
              mutation_prob: float = 0.1, progress: Progress | None = None) -> list[dict]:
    """MetaPruning's evolutionary search: a random population, then each iteration
    `mutations` mutants and `crossovers` crossovers of the top `parents` so far. Children
    that break the budget (or repeat a config) are redrawn."""
    if parents > population:
        raise CompressError(f"the parent count ({parents}) is larger than the population ({population}); "
                            "use `parents` <= `population`.")
    if min(population, parents, iterations) < 1 or mutations < 0 or crossovers < 0 or not 0 <= mutation_prob <= 1:
        raise CompressError("evolution needs population, parents and iterations >= 1, mutation and crossover "
                            "counts >= 0 and a mutation probability in [0, 1].")
    space = evaluator.space
    sampler = CandidateSampler(space, budget, evaluator.latency)
    seen = evaluator.score_many(sampler.draw(rng, population), progress=True)
    top = _rank(seen)[:parents]
    widths = [np.array(g.widths) for g in space.groups]
    for it in range(iterations):
        known = {e["config"] for e in seen}

        def child(make) -> ChannelConfig | None:
            for _ in range(100):
                config = make()
                if config not in known and sampler.feasible(config):
                    known.add(config)
                    return config
            return None

        def mutate() -> ChannelConfig:
            parent = top[rng.integers(len(top))]["config"]
            genes = [int(w[rng.integers(len(w))]) if rng.random() < mutation_prob else parent[g.name]
                     for g, w in zip(space.groups, widths)]
            return ChannelConfig(dict(zip(space.by_name, genes)))

        def cross() -> ChannelConfig:
            a, b = (top[i]["config"] for i in rng.integers(len(top), size=2))
            return ChannelConfig({g.name: (a if rng.random() < 0.5 else b)[g.name] for g in space.groups})

        children = [c for c in [child(mutate) for _ in range(mutations)] + [child(cross) for _ in range(crossovers)]
                    if c is not None]
        seen += evaluator.score_many(children, progress=True)
        top = _rank(seen)[:parents]
        if progress:
            progress(f"evolution {budget.label()}: iteration {it + 1}/{iterations}, {len(children)} children, "
                     f"best top-1 {top[0]['top1']:.2%} at {top[0]['macs'] / 1e6:.2f}M MACs")
    return _rank(seen)


NOTCH = 0.1  # AutoSlim's trial: a tenth of one group's full width


def greedy(evaluator: Evaluator, budgets: list[Budget], step: float = 0.05,
           progress: Progress | None = None) -> tuple[dict[Budget, dict], list[dict]]:
    """AutoSlim's greedy slimming, in steps of the MACs: from the full config, each step tries
    narrowing every group by a tenth of its full width (AutoSlim's trial; to its smallest width
    when less is left), ranks the trials by accuracy lost per MAC removed, and applies the best
    ones together until `step` of the current MACs is gone (or the next budget is met). AutoSlim
    applies one trial per step: hundreds of steps on MobileNetV2; this needs ~log(0.5)/log(1 -
    step) to reach half the MACs, whatever the depth. While a latency budget is left, MACs give
    way to predicted milliseconds (ranked per ms removed, steps of the time), as HALP allocates:
    ranked per MAC, the 224-px MobileNetV2 pick kept 39% of the MACs where the direct cut by
    importance per ms kept 51%, at the same measured time (benchmarks/RESULTS.md). Records the
    first config within each budget; stops after the last. Returns (budget -> entry, every
    step's chosen entry)."""
    if not 0 < step < 1:
        raise CompressError(f"the greedy step is a share of the current MACs (or predicted time) in (0, 1), got {step}.")
    space = evaluator.space
    config = space.max()
    current = evaluator.score(config)
    found: dict[Budget, dict] = {}
    path = [current]
    remaining = sorted(budgets, key=lambda b: -(b.macs or 0))
    start = time.perf_counter()
    while True:
        for b in [b for b in remaining if not b.violations(current)]:
            found[b] = current
            remaining.remove(b)
        if not remaining:
            return found, path
        trials = {g.name: _notched(space, config, g.name) for g in space.groups if config[g.name] > g.min}
        if not trials:
            raise CompressError(f"greedy slimming reached the smallest config without meeting "
                                f"{', '.join(b.label() for b in remaining)}.")
        before = current
        scored = evaluator.score_many(list(trials.values()), progress=True)
        key = "latency_ms" if any(b.latency_ms for b in remaining) and evaluator.latency else "macs"
        cost = evaluator.latency if key == "latency_ms" else space.macs
        # a gain counts as no loss (on a few hundred held-out images it is noise); among trials
        # that lose nothing, the larger cut first; one that saves no predicted time, last
        ranked = sorted(zip(trials, scored), key=lambda t: (
            max(0.0, before["top1"] - t[1]["top1"]) / (before[key] - t[1][key]) if before[key] > t[1][key]
            else math.inf, t[1][key]))
        goal = max([(1 - step) * before[key]] + [getattr(b, key) for b in remaining
                                                 if getattr(b, key) and getattr(b, key) < before[key]])
        widths = dict(config)
        for name, _ in ranked:
            widths[name] = trials[name][name]
            if cost(ChannelConfig(widths)) <= goal:
                break
        config = ChannelConfig(widths)
        current = evaluator.score(config)
        path.append(current)
        if progress:
            changed = sum(config[k] != before["config"][k] for k in config)
            ms = f", {current['latency_ms']:.3f} ms predicted" if key == "latency_ms" else ""
            progress(f"greedy step {len(path) - 1}: {len(trials)} trials, {changed} group{'s' * (changed > 1)} "
                     f"narrowed, kept {current['macs'] / 1e6:.2f}M MACs{ms}, top-1 {current['top1']:.2%}"
                     f"{_eta(remaining, path, time.perf_counter() - start)}")


def _notched(space: ChannelSpace, config: ChannelConfig, name: str) -> ChannelConfig:
    """`config` with group `name` a notch narrower (a tenth of its full width, or to its smallest
    width when less is left)."""
    group = space.by_name[name]
    lower = [x for x in group.widths if x < config[name]]
    return ChannelConfig({**config, name: max((x for x in lower if x <= config[name] - NOTCH * group.max),
                                              default=lower[0])})


def _eta(remaining: list[Budget], path: list[dict], elapsed: float) -> str:
    """About how many more steps (and how long) to the smallest MAC budget left, at the pace so
    far (a step that narrows a small group to its minimum removes less than the step share)."""
    steps, macs = len(path) - 1, path[-1]["macs"]
    goal = min((b.macs for b in remaining if b.macs and b.macs < macs), default=None)
    if goal is None or macs >= path[0]["macs"]:
        return ""
    left = max(1, math.ceil(steps * math.log(goal / macs) / math.log(macs / path[0]["macs"])))
    return f"; ~{left} more step{'s' * (left > 1)} (~{left * elapsed / steps / 60:.0f} min) to {goal / 1e6:.2f}M MACs"
