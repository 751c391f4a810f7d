"""Least-squares reconstruction after pruning (He et al. 2017, ThiNet): each layer that lost
input channels is refitted so that, on a few hundred real images, its output matches the
unpruned layer's output from the channels that remain.

Layers are refitted in execution order on the *pruned* network's inputs, so each one also
absorbs the error its predecessors left behind. Only plain convs and linear layers are refitted
(a depthwise conv mixes no channels, so it has nothing to recombine). BN statistics are left as
they are: each refitted layer reproduces the unpruned layer's output, which those statistics
describe (re-estimating them after the refit cost 2 points at 50% MACs).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

# module name -> (kept output indices, kept input indices) in the unpruned layer's numbering
ChannelMap = Mapping[str, tuple[Sequence[int], Sequence[int]]]


def mixes_channels(module: nn.Module) -> bool:
    """A layer whose outputs are weighted sums over its input channels (not a depthwise or
    grouped conv)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once the layer of interest has run."""


def _io_at(model: nn.Module, module: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}

    def hook(_, inputs, output):
        seen["io"] = (inputs[0], output)
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        model(images)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen["io"]


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as one row per output position, columns in its weight's order."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _targets(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output with rows in `_rows`' order (sample, then row-major position)."""
    return y.reshape(-1, y.shape[-1]) if isinstance(module, nn.Linear) else y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the channel-mixing layers in the order a forward pass reaches them."""
    names = {m: n for n, m in model.named_modules()}
    order, handles = [], []
    for module in names:
        if mixes_channels(module):
            handles.append(module.register_forward_hook(lambda m, i, o: order.append(names[m])))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


@torch.no_grad()
def reconstruct(original: nn.Module, pruned: nn.Module, kept: ChannelMap, images: torch.Tensor,
                batch_size: int = 64, max_rows: int = 4096, ridge: float = 1e-3, seed: int = 0,
                progress: bool = False) -> list[str]:
    """Refit `pruned`'s channel-mixing layers in place, from the first one that lost input
    channels on, so each reproduces `original`'s output on `images` (ridge regression pulled
    towards the layer's unpruned weights, which keeps it well-posed on few images). `kept` maps
    layer names to the channels each one kept. Returns the names of the refitted layers."""
    original.eval()
    pruned.eval()
    device = next(pruned.parameters()).device
    order = execution_order(pruned, images[:1].to(device))
    start = next((i for i, name in enumerate(order)
                  if name in kept and len(kept[name][1]) < _in_features(original.get_submodule(name))), None)
    if start is None:
        return []
    generator = torch.Generator().manual_seed(seed)
    refitted = []
    for name in tqdm(order[start:], desc="reconstruct", unit="layer", disable=not progress, leave=False):
        layer, reference = pruned.get_submodule(name), original.get_submodule(name)
        out_idx, in_idx = kept.get(name, (range(_out_features(reference)), range(_in_features(reference))))
        out_idx = torch.as_tensor(list(out_idx), device=device)
        gram = cross = None
        for batch in images.split(batch_size):
            batch = batch.to(device)
            x, _ = _io_at(pruned, layer, batch)
            _, y = _io_at(original, reference, batch)
            rows, target = _rows(layer, x), _targets(reference, y).index_select(1, out_idx)
            if reference.bias is not None:
                target = target - reference.bias[out_idx]
                rows = torch.cat([rows, torch.ones(len(rows), 1, device=device)], 1)
            if len(rows) > max_rows:
                pick = torch.randperm(len(rows), generator=generator)[:max_rows].to(device)
                rows, target = rows[pick], target[pick]
            # float32 products (per batch, few thousand rows) summed in float64: fast and exact enough
            gram = (rows.T @ rows).double() if gram is None else gram + (rows.T @ rows).double()
            cross = (rows.T @ target).double() if cross is None else cross + (rows.T @ target).double()
        prior = _kept_weight(reference, out_idx, list(in_idx)).double()
        if reference.bias is not None:
            prior = torch.cat([prior, torch.zeros(len(out_idx), 1, dtype=prior.dtype, device=device)], 1)
        lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
        solution = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=device),
                                      cross + lam * prior.T).T
        if reference.bias is not None:
            layer.bias.copy_(reference.bias[out_idx] + solution[:, -1].to(layer.bias))
            solution = solution[:, :-1]
        layer.weight.copy_(solution.reshape(layer.weight.shape).to(layer.weight))
        refitted.append(name)
    return refitted


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _kept_weight(module: nn.Module, out_idx: torch.Tensor, in_idx: list[int]) -> torch.Tensor:
    w = module.weight.index_select(0, out_idx).index_select(1, torch.as_tensor(in_idx, device=out_idx.device))
    return w.reshape(len(out_idx), -1)
