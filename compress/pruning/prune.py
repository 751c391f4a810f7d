"""Materialize a channel config as a plain, physically smaller nn.Module (torch-pruning), and
the one core every front end prunes through: a carded model cut to a config, a uniform width,
or budgets (MACs, params) spread by importance (`prune_target`)."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.errors import CompressError
from compress.logs import notes
from compress.models.card import card_of
from compress.models.zoo import build_model
from compress.pruning.allocation import allocate
from compress.pruning.batchnorm import fold_statistics, recalibrate
from compress.pruning.importance import Importance, scores_on
from compress.pruning.reconstruct import mixes_channels, reconstruct
from compress.settings import PruneSettings
from compress.pruning.space import ChannelConfig, ChannelGroup, ChannelSpace
from compress.pruning.graph import dependency_graph, example_input, pruning_group
from compress.units import parse_count


def dropped_channels(group: ChannelGroup, scores: np.ndarray, width: int) -> list[int]:
    """The channels of `group` that a width of `width` removes: the lowest scored, the same
    positions in each of the group's slices."""
    size = group.max // group.slices
    per = scores.reshape(group.slices, size).mean(0)
    drop = np.argsort(-per, kind="stable")[width // group.slices:]
    return sorted((drop[None, :] + size * np.arange(group.slices)[:, None]).ravel().tolist())


def prune(model: nn.Module, config: Mapping[str, int], space: ChannelSpace | None = None,
          importance: str | Importance = "l1", batch=None, input_size: int | None = None) -> nn.Module:
    """A copy of `model` pruned to exactly the widths of `config`.

    Within each group the channels with the highest importance are kept
    (`first` keeps the first k, as slimmable-trained weights need).
    """
    return prune_with_map(model, config, space, importance, batch, input_size)[0]


def prune_with_map(model: nn.Module, config: Mapping[str, int], space: ChannelSpace | None = None,
                   importance: str | Importance = "l1", batch=None, input_size: int | None = None,
                   scores: dict[str, np.ndarray] | None = None) -> tuple[nn.Module, dict[str, tuple[list[int], list[int]]]]:
    """`prune`, also returning which channels each layer kept: layer name -> (kept output
    indices, kept input indices) in the unpruned layer's numbering (what reconstruction needs).
    `scores` (from `group_scores`) saves measuring importance again."""
    if space is None:
        if input_size is None:
            raise CompressError("prune() needs a space or an input size to trace the model.")
        space = ChannelSpace.from_model(model, example_input(input_size, model))
    config = space.validate(config)
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    pruned.eval()
    graph = dependency_graph(pruned, example_input(space.input_size[-1], pruned))
    if scores is None and any(config[g.name] < g.max for g in space.groups):
        scores = scores_on(pruned, space, importance, batch, graph)
    names = {m: n for n, m in pruned.named_modules()}
    dropped: dict[str, tuple[set, set]] = {}
    for g in space.groups:
        width = config[g.name]
        if width == g.max:
            continue
        # every layer dimension belongs to exactly one group, so these indices are the unpruned ones
        group = pruning_group(graph, pruned, g.name, dropped_channels(g, scores[g.name], width))
        for dep, idxs in group.items:
            out = graph.is_out_channel_pruning_fn(dep.handler)
            if out or graph.is_in_channel_pruning_fn(dep.handler):
                entry = dropped.setdefault(names.get(dep.target.module, ""), (set(), set()))
                entry[0 if out else 1].update(getattr(i, "idx", i) for i in idxs)
        try:
            group.prune()
        except Exception as exc:  # an op torch-pruning maps wrongly: say where, not its internals
            raise CompressError(f"torch-pruning failed to prune the channel group of layer '{g.name}' to {width} of "
                                f"{g.max} ({type(exc).__name__}: {exc}); the group reaches "
                                f"{', '.join(g.members[:6])}. Keep it at full width ({{\"{g.name}\": {g.max}}} in "
                                "a channel config) and report the architecture.") from None
    pruned.zero_grad(set_to_none=True)
    _check_runs(pruned, space, config)
    kept = {}
    for name, module in model.named_modules():
        if name in dropped and mixes_channels(module):
            n_out, n_in = ((module.out_features, module.in_features) if isinstance(module, nn.Linear)
                           else (module.out_channels, module.in_channels))
            kept[name] = ([i for i in range(n_out) if i not in dropped[name][0]],
                          [i for i in range(n_in) if i not in dropped[name][1]])
    return pruned.train(was_training), kept


def _check_runs(pruned: nn.Module, space: ChannelSpace, config: ChannelConfig) -> None:
    """A pruned model that no longer runs is refused here, before anyone trains or exports it."""
    try:
        with torch.no_grad():
            pruned(example_input(space.input_size[-1], pruned))
    except Exception as exc:
        cut = [f"{g.name} {config[g.name]}/{g.max}" for g in space.groups if config[g.name] < g.max]
        raise CompressError(f"the pruned model fails on its first forward pass ({type(exc).__name__}: "
                            f"{str(exc)[:300]}): an op in its code depends on a channel count that pruning changed "
                            f"(pruned groups: {', '.join(cut[:8])}{' ...' if len(cut) > 8 else ''}). Keep the group "
                            "that feeds that op at full width in a channel config, and report the architecture.") from None


def space_for(model: nn.Module, divisor: int | None = None) -> ChannelSpace:
    """The channel space a carded model is pruned within: its own, or for a model pruned
    before, the widths its unpruned architecture allows (see `within`)."""
    card = card_of(model)
    if card.pruned:
        return ChannelSpace.from_model(model, example_input(card.input_size, model),
                                       **(card.space or {})).within(_unpruned_space(card))
    return ChannelSpace.from_model(model, example_input(card.input_size, model),
                                   divisor=divisor or PruneSettings().divisor)


def budget_counts(space: ChannelSpace, macs: str | int | None = None, params: str | int | None = None
                  ) -> dict[str, int]:
    """MAC and parameter budgets as absolute counts (a percentage is of the unpruned model)."""
    full = {"macs": space.macs(space.max()), "params": space.params(space.max())}
    return {key: parse_count(value, "MAC count" if key == "macs" else "parameter count", full=full[key])
            for key, value in (("macs", macs), ("params", params)) if value is not None}


def prune_target(model: nn.Module, config: str | Path | Mapping | None = None, macs: str | int | None = None,
                 width: float | None = None, importance: str | Importance | None = None, strategy: str | None = None,
                 divisor: int | None = None, batch=None, params: str | int | None = None,
                 space: ChannelSpace | None = None, scores: dict[str, np.ndarray] | None = None
                 ) -> tuple[nn.Module, dict]:
    """Prune a model that carries a card to a config (or JSON file), to budgets (`macs`,
    `params`: counts or percentages of the unpruned model, together or alone) or to a uniform
    width; the result carries the card with its channel config. Unset choices take
    PruneSettings' defaults (importance `auto`: energy with `batch`, l1 without); `space` and
    `scores`, when the caller has them, save tracing and ranking again. `info` has the sizes
    before, the strategy and `kept` (what `prune_with_map` returns)."""
    defaults = PruneSettings()
    importance = importance or defaults.importance_for(batch is not None)
    strategy = strategy or defaults.strategy
    card = card_of(model)
    space = space or space_for(model, divisor)
    if space.held:
        free = sum(g.max for g in space.groups)
        notes.info(f"{len(space.held)} channel group(s) ({space.held_channels} channels) stay at full width, "
                   f"{len(space.groups)} ({free} channels) are free to prune: " + "; ".join(
                       f"'{name}': {why}" for name, why in list(space.held.items())[:3])
                   + (" ..." if len(space.held) > 3 else ""))
    info = {"macs_before": space.macs(space.max()), "params_before": space.params(space.max()), "strategy": None}
    budgets = budget_counts(space, macs, params)
    if sum(x is not None for x in (config, width, budgets or None)) != 1:
        raise CompressError("give one of a channel config, budgets (MACs and/or params) or a width multiplier.")
    if config is not None:
        chosen = space.validate(ChannelConfig.load(config) if isinstance(config, (str, Path)) else config)
    elif budgets:
        for key, limit in budgets.items():
            space.check_budget(key, limit)
        scores = scores or scores_on(copy.deepcopy(model).eval(), space, importance, batch)
        chosen = allocate(space, budgets, strategy, scores)
        info.update(strategy=strategy, **{f"target_{key}": limit for key, limit in budgets.items()})
    else:
        chosen = space.uniform(width)
        info.update(strategy="uniform")
    pruned, info["kept"] = prune_with_map(model, chosen, space, importance=importance, batch=batch, scores=scores)
    pruned.card = card.replace(config=chosen.to_dict(), space=space.settings())
    return pruned, info


def _unpruned_space(card) -> ChannelSpace:
    """The channel space of a pruned zoo model's unpruned architecture."""
    if "zoo" not in card.arch:
        raise CompressError(f"'{card.source}' is a pruned model of your own class ({card.arch.get('user', '?')}); "
                            "to prune it further, prune its unpruned parent "
                            f"({card.provenance.get('parent', 'the original model')}) to the smaller target.")
    base = build_model(card.arch["zoo"], **card.arch.get("kwargs", {}))
    return ChannelSpace.from_model(base, example_input(card.input_size, base), **(card.space or {}))


def restore_outputs(original: nn.Module, pruned: nn.Module, kept: dict, images: torch.Tensor,
                    reconstruct_images: int, recal_images: int, progress: bool = False) -> dict:
    """After pruning, on real training images: refit the pruned layers by least squares
    (compress.pruning.reconstruct) on `reconstruct_images` of them and make every BN's statistics those
    of the refitted net, its function unchanged (compress.pruning.batchnorm.fold_statistics), so that a
    fine-tune's train-mode BN starts where the net is; else re-estimate BN statistics on
    `recal_images` (the removed channels took their share of every later layer's input with
    them). Returns what was done, for the checkpoint's provenance."""
    device = next(pruned.parameters()).device
    if reconstruct_images:
        chosen = images[:reconstruct_images]
        reconstruct(original, pruned, kept, chosen, progress=progress)
        fold_statistics(pruned, chosen.split(64), device)
        return {"reconstructed_on": len(chosen)}
    if recal_images:
        recalibrate(pruned, images[:recal_images].split(64), device)
        return {"bn_recalibrated_on": min(recal_images, len(images))}
    return {}
