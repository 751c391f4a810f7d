"""Channel importance: how much each channel of each group matters (higher is kept).

An importance is an object with one method, as Torch-Pruning's `Importance` is: the pruner,
the allocation and the slimmable supernet's channel order all ask it, by name through the
registry (`PruneSettings.importance`, `--importance`, a recipe's `prune.importance`) or as the
object itself. Register your own with `register("mine", MyImportance())`.
"""
from __future__ import annotations

import abc
import copy

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from compress.errors import CompressError
from compress.pruning.energy import energy_scores
from compress.pruning.space import ChannelSpace
from compress.pruning.graph import dependency_graph, example_input, pruning_group

Batch = tuple  # (images, labels) of real training data, or None


class Importance(abc.ABC):
    """Per-channel scores of every group of `space` on `model` (unpruned numbering). Set
    `needs_data` when the scores are measured on real images (`batch`); `graph` (torch-pruning's
    dependency graph of `model`) is None when `needs_graph` is off."""

    needs_data = False
    needs_graph = True

    @abc.abstractmethod
    def scores(self, model: nn.Module, space: ChannelSpace, graph: tp.DependencyGraph,
               batch: Batch | None) -> dict[str, np.ndarray]:
        """Each group's per-channel scores, higher kept."""


class GroupImportance(Importance):
    """A torch-pruning group importance (magnitude, BN scale, Taylor), applied to each group."""

    def __init__(self, make, needs_data: bool = False):
        self.make, self.needs_data = make, needs_data

    def scores(self, model, space, graph, batch):
        if self.needs_data:  # Taylor: first-order terms need the loss's gradients on real labels
            images, labels = batch
            model.zero_grad()
            with torch.enable_grad():
                nn.functional.cross_entropy(model(images), labels).backward()
        imp = self.make()
        return {g.name: imp(pruning_group(graph, model, g.name, list(range(g.max)))).detach().cpu().double().numpy()
                for g in space.groups}


class First(Importance):
    """Earlier channels matter more: the first k are kept (slimmable-trained weights need it)."""

    needs_graph = False

    def scores(self, model, space, graph, batch):
        return {g.name: np.arange(g.max, 0, -1, dtype=np.float64) for g in space.groups}


class Energy(Importance):
    """Each channel's share of the next layers' output energy, measured on real images
    (compress.pruning.energy)."""

    needs_data = True

    def scores(self, model, space, graph, batch):
        return energy_scores(model, space, batch[0], graph=graph)


_REGISTRY: dict[str, Importance] = {
    "energy": Energy(),
    "l1": GroupImportance(lambda: tp.importance.GroupMagnitudeImportance(p=1)),
    "l2": GroupImportance(lambda: tp.importance.GroupMagnitudeImportance(p=2)),
    "bn": GroupImportance(lambda: tp.importance.BNScaleImportance()),
    "taylor": GroupImportance(lambda: tp.importance.GroupTaylorImportance(), needs_data=True),
    "first": First(),
}


def register(name: str, importance: Importance) -> None:
    """Make `importance` available by `name` wherever an importance is named (settings, CLI,
    recipes)."""
    if not isinstance(importance, Importance):
        raise CompressError(f"importance '{name}' must be a compress.pruning.importance.Importance (a `scores` "
                            f"method); got {type(importance).__name__}.")
    _REGISTRY[name] = importance


def names() -> list[str]:
    return list(_REGISTRY)


def importance_of(importance: str | Importance) -> Importance:
    if isinstance(importance, Importance):
        return importance
    if importance not in _REGISTRY:
        raise CompressError(f"unknown importance '{importance}'; choose one of {', '.join(_REGISTRY)} (or register "
                            "your own with compress.pruning.importance.register).")
    return _REGISTRY[importance]


def needs_data(importance: str | Importance) -> bool:
    return importance_of(importance).needs_data


def scores_on(model: nn.Module, space: ChannelSpace, importance: str | Importance, batch: Batch | None = None,
              graph: tp.DependencyGraph | None = None) -> dict[str, np.ndarray]:
    """Per-channel scores of every group of `model` itself (gradients may be left on it); a
    group cut into equal slices loses the same positions from every slice, so each position
    scores its mean over the slices."""
    imp = importance_of(importance)
    if imp.needs_data and batch is None:
        raise CompressError(f"importance '{importance}' needs a batch of real (images, labels) to measure on; pass "
                            f"batch=... (CLI: give --data, or use one of "
                            f"{', '.join(n for n in _REGISTRY if not needs_data(n))}).")
    if graph is None and imp.needs_graph:
        graph = dependency_graph(model, example_input(space.input_size[-1], model))
    scores = imp.scores(model, space, graph, batch)
    return {g.name: np.tile(scores[g.name].reshape(g.slices, -1).mean(0), g.slices) for g in space.groups}


def group_scores(model: nn.Module, space: ChannelSpace, importance: str | Importance = "l1",
                 batch: Batch | None = None) -> dict[str, np.ndarray]:
    """Per-channel importance of every group, measured on a copy of `model` in eval mode."""
    return scores_on(copy.deepcopy(model).eval(), space, importance, batch)
