"""The prune stage: the one entry point that cuts a model to budgets (MACs, params), a channel
config or a uniform width, ranking channels by an importance from the registry; with data,
measured on its images and the pruned layers refitted to the unpruned outputs on them."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.checkpoint import save_checkpoint
from compress.data.source import DataSource
from compress.models.card import card_of
from compress.pruning.importance import importance_of, needs_data
from compress.pruning.profile import count
from compress.pruning.prune import prune_target, restore_outputs
from compress.settings import PruneSettings


@dataclass
class Pruned:
    model: nn.Module
    checkpoint: Path | None
    macs_before: int
    params_before: int
    macs: int
    params: int
    restored: dict = field(default_factory=dict)  # what restore_outputs did


def prune(model: nn.Module, settings: PruneSettings = PruneSettings(), macs: str | int | None = None,
          config: str | Path | Mapping | None = None, width: float | None = None, output: str | Path | None = None,
          provenance: dict | None = None, data=None, progress: bool = False,
          params: str | int | None = None) -> Pruned:
    """Prune `model` (carrying a card) to budgets (`macs`, `params`: counts like 150M or
    percentages of the unpruned model; both are met when both are given), a channel config (or
    its JSON file) or a uniform width, keeping each group's most important channels
    (`settings.importance`). With `data` (a data source: a spec, DataSettings or your own
    Loaders), importance is measured on its training images and the pruned layers are refitted
    to the unpruned outputs on them (or BN re-estimated; `restore_outputs`). Saved to `output`
    if given."""
    source = DataSource.of(data) if data is not None else None
    importance = settings.importance_for(source is not None)
    importance_of(importance)  # an unknown name is refused before any work
    restored = {}
    batch = pruning_batch(model, settings, source) if source is not None else None
    pruned, info = prune_target(model, config=config, macs=macs, params=params, width=width, importance=importance,
                                strategy=settings.strategy, divisor=settings.divisor, batch=batch)
    if batch is not None:
        restored = restore_outputs(model, pruned, info["kept"], batch[0], settings.reconstruct_images,
                                   settings.recal_images, progress=progress)
    record = None
    if output is not None:
        record = save_checkpoint(output, pruned, provenance={
            "created_by": "prune", "importance": importance, "strategy": info["strategy"],
            **{k: info[k] for k in ("target_macs", "target_params") if k in info}, **restored, **(provenance or {})})
    macs_after, params_after = ((record["macs"], record["params"]) if record else
                                count(pruned, card_of(pruned).input_size))
    return Pruned(pruned, Path(output) if output else None, info["macs_before"], info["params_before"],
                  macs_after, params_after, restored)


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
