"""The prune stage: the one entry point that cuts a model to budgets (MACs, params, measured
latency), a channel config or a uniform width, ranking channels by an importance from the
registry; with data, measured on its images and the pruned layers refitted to the unpruned
outputs on them."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.checkpoint import save_checkpoint
from compress.data.source import DataSource
from compress.errors import CompressError
from compress.latency import LatencyModel, cached_latency_model, clock_of
from compress.latency.budget import latency_limit, meet_latency
from compress.models.card import card_of
from compress.pruning.importance import importance_of, needs_data, scores_on
from compress.pruning.profile import count
from compress.pruning.prune import budget_counts, prune_target, restore_outputs, space_for
from compress.settings import LutSettings, PruneSettings
from compress.units import parse_latency


@dataclass
class Pruned:
    model: nn.Module
    checkpoint: Path | None
    macs_before: int
    params_before: int
    macs: int
    params: int
    restored: dict = field(default_factory=dict)  # what restore_outputs did
    latency: dict = field(default_factory=dict)  # a latency budget: predicted and measured times


def prune(model: nn.Module, settings: PruneSettings = PruneSettings(), macs: str | int | None = None,
          config: str | Path | Mapping | None = None, width: float | None = None, output: str | Path | None = None,
          provenance: dict | None = None, data=None, progress: bool = False,
          params: str | int | None = None, latency: str | None = None, clock: LutSettings = LutSettings(),
          latency_model: str | Path | None = None) -> Pruned:
    """Prune `model` (carrying a card) to budgets (`macs`, `params`: counts like 150M or
    percentages of the unpruned model; `latency`: 3.5ms or a percentage of the unpruned file's
    measured time on `clock`; every budget given is met), a channel config (or its JSON file) or
    a uniform width, keeping each group's most important channels (`settings.importance`).

    A latency budget is met as measured: the cut keeps the most importance per millisecond the
    latency model predicts (`latency_model`, or this machine's cached one, built when missing),
    the file is exported and timed, and the cut corrected until it runs within 5% under the
    budget. With `data` (a data source: a spec, DataSettings or your own Loaders), importance
    is measured on its training images and the pruned layers are refitted to the unpruned
    outputs on them (or BN re-estimated; `restore_outputs`). Saved to `output` if given."""
    source = DataSource.of(data) if data is not None else None
    importance = settings.importance_for(source is not None)
    importance_of(importance)  # an unknown name is refused before any work
    restored, timing, space, scores = {}, {}, None, None
    if latency is not None and (config is not None or width is not None):
        raise CompressError("a latency budget chooses the widths itself: give `latency` alone or with `macs`/"
                            "`params`, not with a channel config or a width.")
    if latency is not None:
        parse_latency(latency, 1.0)  # a malformed budget is refused before anything is timed
        space = space_for(model, settings.divisor)
        fitted = _latency_model(model, space, latency, clock, latency_model, progress)
    batch = pruning_batch(model, settings, source) if source is not None else None
    if latency is not None:
        scores = scores_on(copy.deepcopy(model).eval(), space, importance, batch)
        config, timing = meet_latency(model, space, scores, latency, fitted, clock_of(clock),
                                      budget_counts(space, macs, params), settings.strategy)
        macs = params = None
    pruned, info = prune_target(model, config=config, macs=macs, params=params, width=width, importance=importance,
                                strategy=settings.strategy, divisor=settings.divisor, batch=batch, space=space,
                                scores=scores)
    if batch is not None:
        restored = restore_outputs(model, pruned, info["kept"], batch[0], settings.reconstruct_images,
                                   settings.recal_images, progress=progress)
    record = None
    if output is not None:
        record = save_checkpoint(output, pruned, provenance={
            "created_by": "prune", "importance": importance, "strategy": info["strategy"] or (settings.strategy if timing else None),
            **{k: info[k] for k in ("target_macs", "target_params") if k in info},
            **({"latency": timing} if timing else {}), **restored, **(provenance or {})})
    macs_after, params_after = ((record["macs"], record["params"]) if record else
                                count(pruned, card_of(pruned).input_size))
    return Pruned(pruned, Path(output) if output else None, info["macs_before"], info["params_before"],
                  macs_after, params_after, restored, timing)


def _latency_model(model: nn.Module, space, budget: str, clock: LutSettings, path: str | Path | None,
                   progress: bool) -> LatencyModel:
    """The latency model (a file, or this machine's cache), after refusing a budget no config
    can meet before any more is measured."""
    held = f"; {len(space.held)} group(s) held at full width" if space.held else ""
    if path is not None:
        fitted = LatencyModel.load(path, space, clock_of(clock).identity())
        latency_limit(budget, fitted.unpruned_ms, fitted.floor_ms, held)
        return fitted
    return cached_latency_model(model, space, clock_of(clock), clock.samples, progress,
                                on_ends=lambda unpruned, floor: latency_limit(budget, unpruned, floor, held),
                                rebuild=clock.rebuild)


def pruning_batch(model: nn.Module, settings: PruneSettings, data) -> tuple[torch.Tensor, object] | None:
    """The training images (and labels) `prune` measures importance and refits on, or None
    when `settings` needs none; seeded, so every caller sees the same ones."""
    wanted = max(settings.reconstruct_images, settings.recal_images)
    if not (wanted or needs_data(settings.importance_for(True))):
        return None
    card = card_of(model)
    source = DataSource.of(data)
    source.check_task(card.task)
    device = next(model.parameters()).device
    return source.sample(wanted or 256, card.input_size, card.mean, card.std, device, seed=0)
