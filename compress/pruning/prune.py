"""Materialize a channel config as a plain, physically smaller nn.Module (torch-pruning)."""
from __future__ import annotations

import copy
from pathlib import Path
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from compress.pruning.batchnorm import fold_statistics, recalibrate
from compress.models.card import card_of
from compress.pruning.energy import energy_scores
from compress.errors import CompressError
from compress.logs import notes
from compress.models.zoo import build_model
from compress.pruning.reconstruct import mixes_channels, reconstruct
from compress.pruning.space import ChannelConfig, ChannelGroup, ChannelSpace, dependency_graph, example_input, pruning_group
from compress.units import human, parse_count

IMPORTANCES = ("l1", "l2", "first", "taylor", "bn", "energy")
DATA_DRIVEN = ("taylor", "energy")
STRATEGIES = ("uniform", "global")


def _importance(name: str):
    if name not in IMPORTANCES:
        raise CompressError(f"unknown importance '{name}'; choose one of {', '.join(IMPORTANCES)}.")
    return {"l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
            "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.GroupTaylorImportance(),
            "bn": lambda: tp.importance.BNScaleImportance(),
            "first": lambda: None,
            "energy": lambda: None}[name]()


def _taylor_gradients(model: nn.Module, batch) -> None:
    images, labels = batch
    model.zero_grad()
    with torch.enable_grad():
        nn.functional.cross_entropy(model(images), labels).backward()


def group_scores(model: nn.Module, space: ChannelSpace, importance: str = "l1",
                 batch=None) -> dict[str, np.ndarray]:
    """Per-channel importance of every group (torch-pruning's group importance, or `energy`:
    measured on the images of `batch`, see compress.pruning.energy)."""
    model = copy.deepcopy(model).eval()
    return _scores(model, space, importance, batch)


def _scores(model: nn.Module, space: ChannelSpace, importance: str, batch, graph=None) -> dict[str, np.ndarray]:
    imp = _importance(importance)
    if importance in DATA_DRIVEN and batch is None:
        raise CompressError(f"importance '{importance}' needs a batch of real (images, labels) to measure "
                            "on; pass batch=... (CLI: give --data, or use l1, l2, bn or first).")
    if imp is None and importance != "energy":  # "first": earlier channels matter more
        return {g.name: np.arange(g.max, 0, -1, dtype=np.float64) for g in space.groups}
    graph = graph or dependency_graph(model, example_input(space.input_size[-1], model))
    if importance == "energy":
        scores = energy_scores(model, space, batch[0], graph=graph)
    else:
        if importance == "taylor":
            _taylor_gradients(model, batch)
        scores = {g.name: imp(pruning_group(graph, model, g.name, list(range(g.max)))).detach().cpu().double().numpy()
                  for g in space.groups}
    # a sliced group loses the same positions from every slice: each position scores its mean
    return {g.name: np.tile(scores[g.name].reshape(g.slices, -1).mean(0), g.slices) for g in space.groups}


def dropped_channels(group: ChannelGroup, scores: np.ndarray, width: int) -> list[int]:
    """The channels of `group` that a width of `width` removes: the lowest scored, the same
    positions in each of the group's slices."""
    size = group.max // group.slices
    per = scores.reshape(group.slices, size).mean(0)
    drop = np.argsort(-per, kind="stable")[width // group.slices:]
    return sorted((drop[None, :] + size * np.arange(group.slices)[:, None]).ravel().tolist())


def prune(model: nn.Module, config: Mapping[str, int], space: ChannelSpace | None = None,
          importance: str = "l1", batch=None, input_size: int | None = None) -> nn.Module:
    """A copy of `model` pruned to exactly the widths of `config`.

    Within each group the channels with the highest importance are kept
    (`first` keeps the first k, as slimmable-trained weights need).
    """
    return prune_with_map(model, config, space, importance, batch, input_size)[0]


def prune_with_map(model: nn.Module, config: Mapping[str, int], space: ChannelSpace | None = None,
                   importance: str = "l1", batch=None, input_size: int | None = None,
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
        scores = _scores(pruned, space, importance, batch, graph)
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


def config_for_macs(space: ChannelSpace, target_macs: int, strategy: str = "uniform",
                    scores: dict[str, np.ndarray] | None = None) -> ChannelConfig:
    """The config with the most MACs not above `target_macs`.

    `uniform` scales every group by one multiplier; `global` removes, across all
    groups, the least important channels first (needs `scores`). Both then top up
    single groups while the budget allows, so the result lands just under the target.
    """
    if strategy not in STRATEGIES:
        raise CompressError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}.")
    floor = space.macs(space.min())
    full = space.macs(space.max())
    if target_macs < floor:
        raise CompressError(
            f"MAC target {human(target_macs)} is below the smallest config this space allows "
            f"({human(floor)} MACs, every group at its minimum width; {floor - target_macs:,} MACs "
            f"short). Raise the target to at least {human(floor)} or lower the space's min ratio.")
    if target_macs >= full:
        return space.max()
    if strategy == "uniform":
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if space.macs(space.uniform(mid)) <= target_macs:
                lo = mid
            else:
                hi = mid
        config = space.uniform(lo) if lo > 0 and space.macs(space.uniform(lo)) <= target_macs else space.min()
        return _fill(space, config, target_macs, key=lambda g, w: w / g.max)
    if scores is None:
        raise CompressError("strategy 'global' needs channel importance scores.")
    ranked = {g.name: np.sort(scores[g.name])[::-1] for g in space.groups}  # most important first
    widths = dict(space.max())
    macs = full
    while macs > target_macs:
        best, best_cost = None, np.inf
        for g in space.groups:
            w = widths[g.name]
            lower = [x for x in g.widths if x < w]
            if not lower:
                continue
            cost = ranked[g.name][lower[-1]:w].mean()
            if cost < best_cost:
                best, best_cost = (g.name, lower[-1]), cost
        widths[best[0]] = best[1]
        macs = space.macs(widths)
    return _fill(space, ChannelConfig(widths), target_macs,
                 key=lambda g, w: -ranked[g.name][w:_next_width(g, w)].mean())


def _next_width(group, width: int) -> int:
    return min(x for x in group.widths if x > width)


def _fill(space: ChannelSpace, config: ChannelConfig, target_macs: int,
          key: Callable) -> ChannelConfig:
    """Grow single groups one step at a time (lowest `key` first) while MACs stay in budget."""
    widths = dict(config)
    while True:
        options = [g for g in space.groups if widths[g.name] < g.max]
        options.sort(key=lambda g: key(g, widths[g.name]))
        for g in options:
            trial = {**widths, g.name: _next_width(g, widths[g.name])}
            if space.macs(trial) <= target_macs:
                widths = trial
                break
        else:
            return ChannelConfig(widths)


def prune_target(model: nn.Module, config: str | Path | Mapping | None = None, macs: str | int | None = None,
                 width: float | None = None, importance: str = "l1", strategy: str = "uniform",
                 divisor: int = 8, batch=None) -> tuple[nn.Module, dict]:
    """Prune a model that carries a card to a config (or JSON file), a MAC target or a
    uniform width; the result carries the card with its channel config. `info` has the
    sizes before, the strategy and `kept` (what `prune_with_map` returns)."""
    card = card_of(model)
    if card.pruned:  # pruned again: within the widths its unpruned architecture allows (see `within`)
        space = ChannelSpace.from_model(model, example_input(card.input_size, model),
                                        **(card.space or {})).within(_unpruned_space(card))
    else:
        space = ChannelSpace.from_model(model, example_input(card.input_size, model), divisor=divisor)
    if space.held:
        notes.info(f"{len(space.held)} channel group(s) stay at full width: " + "; ".join(
            f"'{name}': {why}" for name, why in list(space.held.items())[:3]) + (" ..." if len(space.held) > 3 else ""))
    full = space.macs(space.max())
    info = {"macs_before": full, "params_before": space.params(space.max()), "strategy": None}
    scores = None
    if config is not None:
        chosen = space.validate(ChannelConfig.load(config) if isinstance(config, (str, Path)) else config)
    elif macs is not None:
        target = parse_count(macs, "MAC count", full=full)
        space.check_budget("macs", target)
        scores = group_scores(model, space, importance, batch)
        chosen = config_for_macs(space, target, strategy, scores)
        info.update(strategy=strategy, target_macs=target)
    elif width is not None:
        chosen = space.uniform(width)
        info.update(strategy="uniform")
    else:
        raise CompressError("give one of a channel config, a MAC target or a width multiplier.")
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
