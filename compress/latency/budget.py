"""Meeting a latency budget as measured: allocate the cut by importance per predicted
millisecond, export and time the result on the clock beside the unpruned file, and correct
the prediction from the measurement until the file runs within TOLERANCE under the budget. The
search corrects its latency picks with the same loop."""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
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


TOLERANCE = 0.05  # a budget is met when the file measures within this share under it


def meet_latency(model: nn.Module, space: ChannelSpace, scores: dict[str, np.ndarray], budget: str,
                 fitted: LatencyModel, clock: Clock, budgets: Mapping[str, int] | None = None,
                 strategy: str = "global", tries: int = 5) -> tuple[ChannelConfig, dict]:
    """The config whose file measures within TOLERANCE under the `budget` (3.5ms, or a share
    of the unpruned file timed now) on `clock`, with the other `budgets` met too, and what was
    predicted and measured on the way there. Each cut is timed beside the unpruned file. A
    budget under the floor was refused with the latency model's own times (`latency_limit`);
    one the machine has drifted under ends in the error below, after the floor's cut is timed."""
    with tempfile.TemporaryDirectory() as tmp:
        timer = BesideUnpruned(model, space, clock, Path(tmp))
        attempts = corrected_cuts(
            lambda target: allocate(space, {**(budgets or {}), "latency": target}, strategy, scores, fitted.predict),
            lambda config: timer.nets([prune_with_map(model, config, space, scores=scores)[0]])[0][0],
            fitted, budget, lambda: timer.unpruned_ms, clock, tries)
        unpruned_ms = timer.unpruned_ms
    limit_ms = parse_latency(budget, unpruned_ms)
    chosen = best_under(attempts, limit_ms / unpruned_ms)
    if chosen is None:
        fastest = min(a["measured"] for a in attempts) * unpruned_ms
        raise CompressError(f"after {len(attempts)} cuts no file measured under the latency budget {limit_ms:.3f} ms "
                            f"on {clock.describe()} (the fastest: {fastest:.3f} ms). The machine may be "
                            "busy (time it again), or the budget is near the floor: raise it.")
    report = {"budget_ms": limit_ms, "predicted_ms": chosen["predicted"] * unpruned_ms,
              "measured_ms": chosen["measured"] * unpruned_ms, "unpruned_ms": unpruned_ms, "clock": clock.describe(),
              "attempts": public(attempts, unpruned_ms)}
    return chosen["config"], report


def corrected_cuts(cut: Callable[[float], ChannelConfig | None], measure: Callable[[ChannelConfig], float],
                   fitted: LatencyModel, budget: str, unpruned_ms: Callable[[], float], clock: Clock, tries: int,
                   first_target: float | None = None) -> list[dict]:
    """Cuts (`cut(predicted-ms target)` -> config, or None when none can aim there), each
    measured, the target corrected from each measurement, until one lies within TOLERANCE under
    the `budget`, a cut repeats or `tries` are spent; every attempt, with its config, and its
    `target`, `predicted` and `measured` times. Every time is a share of the unpruned file's:
    `measure(config)` the cut's time beside it, a prediction the model's over its own unpruned
    time; so the machine's drift since the model was fitted cancels, as does a slow phase when
    the unpruned file was first timed. `unpruned_ms()` is its time now, settled over every
    timing so far, which makes a budget in ms a share. The first target is the middle of the
    window (a re-timing may differ) unless `first_target` (a share) says otherwise."""
    def share(now: float) -> float:
        return parse_latency(budget, now) / now

    floor, attempts = fitted.predict(fitted.space.min()) / fitted.unpruned_ms, []
    target = share(unpruned_ms()) * (1 - TOLERANCE / 2) if first_target is None else first_target
    for _ in range(tries):
        config = cut(max(target, floor) * fitted.unpruned_ms)
        # None: no cut aims there; a config cut before: the MAC or parameter budget (or the
        # floor) holds it, so moving the target changes nothing
        if config is None or any(a["config"] == config for a in attempts):
            break
        predicted = fitted.predict(config) / fitted.unpruned_ms
        attempts.append({"config": config, "target": target, "predicted": predicted, "measured": measure(config)})
        now = unpruned_ms()  # on a search's ranks, one broadcast from the main rank
        limit = share(now)
        notes.info(f"latency: predicted {predicted * now:.3f} ms, measured {attempts[-1]['measured'] * now:.3f} ms "
                   f"on {clock.describe()} (budget {limit * now:.3f} ms)")
        if (1 - TOLERANCE) * limit <= attempts[-1]["measured"] <= limit:
            break
        target = _next_target(attempts, limit * (1 - TOLERANCE / 2))
    return attempts


def best_under(attempts: list[dict], limit: float) -> dict | None:
    """The slowest attempt (the one that kept most) measured under `limit` (a share), if any."""
    met = [a for a in attempts if a["measured"] <= limit]
    return max(met, key=lambda a: a["measured"]) if met else None


def public(attempts: list[dict], unpruned_ms: float) -> list[dict]:
    """The attempts as a report holds them: their times in ms, not their configs."""
    return [{f"{k}_ms": a[k] * unpruned_ms for k in ("target", "predicted", "measured")} for a in attempts]


def _next_target(attempts: list[dict], aim: float) -> float:
    """The predicted time (a share) the next cut should have: the last cut's prediction scaled
    by the model's error on it; where that leaves the bracket of cuts measured under and over
    the aim, the middle of the bracket instead (a safeguarded Newton step). Taken from each
    cut's prediction, not its target: a search's pick lies a coarse step under its target, and a
    target moved by the error alone can pick it again. The bracket is by prediction, the axis
    the cuts move along. The step this replaced interpolated between the cuts measured nearest
    the aim: a timing a busy machine spoiled (a cut timed at 1.9x) held one end of it, and the
    cuts crept towards the window or repeated one (tests/latency)."""
    last = attempts[-1]
    target = last["predicted"] * aim / last["measured"]
    under = [a["predicted"] for a in attempts if a["measured"] < aim]
    over = [a["predicted"] for a in attempts if a["measured"] > aim]
    if under and over and max(under) < min(over) and not max(under) < target < min(over):
        target = (max(under) + min(over)) / 2
    return target
