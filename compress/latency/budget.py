"""Meeting a latency budget as measured: allocate the cut by importance per predicted
millisecond, export and time the result on the clock beside the unpruned file, and correct
the prediction from the measurement until the file runs within `tolerance` under the budget."""
from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from torch import nn

from compress.errors import CompressError
from compress.latency.build import BesideUnpruned
from compress.latency.clock import Clock
from compress.latency.model import LatencyModel
from compress.logs import notes
from compress.pruning.allocation import allocate
from compress.pruning.prune import prune_with_map
from compress.pruning.space import ChannelConfig, ChannelSpace
from compress.units import parse_latency


def latency_limit(text: str, unpruned: float, floor: float, space_note: str = "") -> float:
    """The budget in ms (a share is of the unpruned model's measured time), refused when no
    config can meet it (below the smallest config's measured time) or nothing needs pruning."""
    limit = parse_latency(text, unpruned)
    if limit < floor:
        raise CompressError(f"no config can meet latency <= {limit:.3f} ms ({text}): the smallest config this space "
                            f"allows (every group at its minimum width{space_note}) measures {floor:.3f} ms, "
                            f"{floor - limit:.3f} ms over. Raise the budget to at least {floor:.3f} ms "
                            f"({100 * floor / unpruned:.0f}% of the unpruned {unpruned:.3f} ms), or prune with a "
                            "lower min width.")
    if limit >= unpruned:
        raise CompressError(f"the latency budget {limit:.3f} ms ({text}) is not below the unpruned model's measured "
                            f"{unpruned:.3f} ms: there is nothing to prune. Give a budget below it (60% is a share "
                            "of the unpruned time).")
    return limit


def meet_latency(model: nn.Module, space: ChannelSpace, scores: dict[str, np.ndarray], budget: str,
                 fitted: LatencyModel, clock: Clock, budgets: Mapping[str, int] | None = None,
                 strategy: str = "global", tolerance: float = 0.05, tries: int = 5) -> tuple[ChannelConfig, dict]:
    """The config whose file measures within `tolerance` under the `budget` (3.5ms, or a share
    of the unpruned file timed now) on `clock`, with the other `budgets` met too, and what was
    predicted and measured on the way there. Each cut is timed beside the unpruned file."""
    with tempfile.TemporaryDirectory() as tmp:
        timer = BesideUnpruned(model, space, clock, Path(tmp))
        drift = timer.unpruned_ms / fitted.unpruned_ms  # this machine now, against when the model was fitted
        limit_ms = latency_limit(budget, timer.unpruned_ms, fitted.floor_ms * drift)
        aim, attempts = limit_ms * (1 - tolerance / 2), []  # the middle of the window: a re-timing may differ
        floor, target = fitted.predict(space.min()), aim / drift
        for _ in range(tries):
            config = allocate(space, {**(budgets or {}), "latency": max(target, floor)}, strategy, scores,
                              fitted.predict)
            predicted = fitted.predict(config) * drift
            measured = timer.nets([prune_with_map(model, config, space, scores=scores)[0]])[0][0]
            attempts.append({"config": config, "target_ms": target, "predicted_ms": predicted, "measured_ms": measured})
            notes.info(f"latency: predicted {predicted:.3f} ms, measured {measured:.3f} ms on {clock.describe()} "
                       f"(budget {limit_ms:.3f} ms)")
            within = (1 - tolerance) * limit_ms <= measured <= limit_ms
            bound_elsewhere = measured <= limit_ms and predicted < 0.98 * max(target, floor) * drift  # MACs/params
            if within or bound_elsewhere:
                break
            target = _next_target(attempts, aim)
    met = [a for a in attempts if a["measured_ms"] <= limit_ms]
    if not met:
        best = min(attempts, key=lambda a: a["measured_ms"])
        raise CompressError(f"after {len(attempts)} cuts no file measured under the latency budget {limit_ms:.3f} ms "
                            f"on {clock.describe()} (the fastest: {best['measured_ms']:.3f} ms). The machine may be "
                            "busy (time it again), or the budget is near the floor: raise it.")
    chosen = max(met, key=lambda a: a["measured_ms"])
    report = {"budget_ms": limit_ms, "predicted_ms": chosen["predicted_ms"], "measured_ms": chosen["measured_ms"],
              "unpruned_ms": timer.unpruned_ms, "clock": clock.describe(),
              "attempts": [{k: v for k, v in a.items() if k != "config"} for a in attempts]}
    return chosen["config"], report


def _next_target(attempts: list[dict], aim: float) -> float:
    """The predicted-time target the next cut aims at: between the nearest cuts measured under
    and over the aim when there are both, else the last target scaled by the model's error."""
    under = [a for a in attempts if a["measured_ms"] < aim]
    over = [a for a in attempts if a["measured_ms"] > aim]
    if under and over:
        lo = max(under, key=lambda a: a["measured_ms"])
        hi = min(over, key=lambda a: a["measured_ms"])
        if hi["target_ms"] > lo["target_ms"]:
            share = (aim - lo["measured_ms"]) / (hi["measured_ms"] - lo["measured_ms"])
            return lo["target_ms"] + share * (hi["target_ms"] - lo["target_ms"])
    last = attempts[-1]
    return last["target_ms"] * aim / last["measured_ms"]
