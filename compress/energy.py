"""Data-driven channel importance: the share of the next layers' signal a channel carries.

A channel's importance is, summed over the channel-mixing layers that read it (every consumer
torch-pruning finds in its group), the variance it feeds into each of their outputs relative to
that output's own variance, averaged over outputs: Var[x_c] * |W[o, c]|^2 / Var[y_o]. It is
measured on real images, so it does not depend on how weights happen to be scaled (a BN-folded
or re-quantized checkpoint can carry channels whose conv weights are tiny and whose BN scales
them up 100x; weight norms rank those wrongly), and a channel that is constant on real data
scores zero: BN re-estimation absorbs its loss.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.reconstruct import mixes_channels
from compress.space import ChannelSpace, dependency_graph, example_input, pruning_group


class _Moments:
    """Running per-channel mean and variance of a layer's input and output: each batch's own
    (float32 reductions, which read the activations once) merged in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # (mean, sum of squared deviations) of x, y

    def add(self, linear: bool, x: torch.Tensor, y: torch.Tensor) -> None:
        parts = []
        for t in (x, y):
            dims = tuple(range(t.dim() - 1)) if linear else (0, *range(2, t.dim()))  # all but the channels
            var, mean = torch.var_mean(t, dim=dims, correction=0)
            parts.append((mean.double(), var.double()))
        m = t.numel() // t.shape[-1 if linear else 1]
        if not self.stats:
            self.stats = [(mean, var * m) for mean, var in parts]
        else:
            n = self.n
            self.stats = [(mu + (mean - mu) * m / (n + m), m2 + var * m + (mean - mu) ** 2 * n * m / (n + m))
                          for (mu, m2), (mean, var) in zip(self.stats, parts)]
        self.n += m

    def variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(m2 / self.n for _, m2 in self.stats)


def _relative_energy(module: nn.Module, moments: _Moments) -> torch.Tensor:
    var_x, var_y = moments.variances()
    w2 = module.weight.detach().double().pow(2)
    w2 = w2.reshape(w2.shape[0], w2.shape[1], -1).sum(2)  # over the kernel window
    return (w2 * var_x[None, :] / (var_y[:, None] + 1e-12)).mean(0).cpu()


@torch.no_grad()
def energy_scores(model: nn.Module, space: ChannelSpace, images: torch.Tensor, batch_size: int = 64,
                  graph=None) -> dict[str, np.ndarray]:
    """Per-channel importance of every group of `space`, measured on `images` (`graph`: the
    model's torch-pruning dependency graph, when the caller has built it already)."""
    model = model.eval()
    device = next(model.parameters()).device
    consumers = {m: _Moments() for m in model.modules() if mixes_channels(m)}
    handles = [m.register_forward_hook(lambda m, i, o: consumers[m].add(isinstance(m, nn.Linear), i[0], o)) for m in consumers]
    try:
        for batch in images.split(batch_size):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    energy = {m: _relative_energy(m, s) for m, s in consumers.items() if s.n}
    graph = graph or dependency_graph(model, example_input(space.input_size[-1], model))
    scores = {}
    for g in space.groups:
        score = np.zeros(g.max)
        for item in pruning_group(graph, model, g.name, list(range(g.max))).items:
            module = item.dep.target.module
            if module in energy and graph.is_in_channel_pruning_fn(item.dep.handler):
                # several inputs of one consumer can share a root channel (a flatten before a linear)
                np.add.at(score, item.root_idxs, energy[module][item.idxs].numpy())
        scores[g.name] = score
    return scores
