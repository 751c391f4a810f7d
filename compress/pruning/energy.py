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

from compress.pruning.moments import ChannelMoments
from compress.pruning.reconstruct import mixes_channels
from compress.pruning.space import ChannelSpace
from compress.pruning.graph import dependency_graph, example_input, pruning_group


def _reads_channels(module: nn.Module) -> bool:
    """A layer whose outputs are weighted sums over its input channels, all of them or one
    slice of them (a grouped conv); a depthwise conv only carries its channel to the next."""
    return mixes_channels(module) or (isinstance(module, nn.Conv2d) and 1 < module.groups and not (
        module.groups == module.in_channels == module.out_channels))


def _relative_energy(module: nn.Module, x: ChannelMoments, y: ChannelMoments) -> torch.Tensor:
    var_x, var_y = x.variance, y.variance
    w2 = module.weight.detach().double().pow(2)
    w2 = w2.reshape(w2.shape[0], w2.shape[1], -1).sum(2)  # over the kernel window
    groups = getattr(module, "groups", 1)
    if groups > 1:  # a grouped conv: output o reads only its own slice of the inputs
        w2 = torch.block_diag(*w2.chunk(groups, dim=0))
    return (w2 * var_x[None, :] / (var_y[:, None] + 1e-12)).mean(0).cpu()


@torch.no_grad()
def energy_scores(model: nn.Module, space: ChannelSpace, images: torch.Tensor, batch_size: int = 64,
                  graph=None) -> dict[str, np.ndarray]:
    """Per-channel importance of every group of `space`, measured on `images` (`graph`: the
    model's torch-pruning dependency graph, when the caller has built it already)."""
    model = model.eval()
    device = next(model.parameters()).device
    consumers = {m: (ChannelMoments(isinstance(m, nn.Linear)), ChannelMoments(isinstance(m, nn.Linear)))
                 for m in model.modules() if _reads_channels(m)}

    def hook(module, inputs, output):
        x, y = consumers[module]
        x.add(inputs[0])
        y.add(output)

    handles = [m.register_forward_hook(hook) for m in consumers]
    try:
        for batch in images.split(batch_size):
            model(batch.to(device))
    finally:
        for h in handles:
            h.remove()
    energy = {m: _relative_energy(m, x, y) for m, (x, y) in consumers.items() if x.n}
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
