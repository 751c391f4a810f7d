"""Dynamic layers and the supernet base: any CNN, run at any config of its channel space.

A dynamic layer is the model's own Conv2d / BatchNorm2d / Linear with its class switched,
so parameters, buffers and state_dict keys stay exactly those of the model. Each uses the
channels its `out_sel` / `in_sel` select (`weight[:out, :in]` when they are a prefix, an
index tensor where a layer dimension joins several groups, e.g. after a concat).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.pruning.batchnorm import recalibrate
from compress.errors import CompressError
from compress.pruning.prune import prune
from compress.pruning.space import ChannelSpace
from compress.pruning.graph import dependency_graph, example_input, pruning_group


def _take(t: torch.Tensor | None, sel, dim: int) -> torch.Tensor | None:
    if t is None or sel is None:
        return t
    return t[sel] if dim == 0 else t[:, sel]


class _Dynamic:
    out_sel = None
    in_sel = None
    generated: dict | None = None  # tensors a hypernetwork made for this pass, already at the selected widths

    def sliced(self, name: str, *sels) -> torch.Tensor | None:
        """Parameter `name` at the selected channels (`sels` per leading dimension)."""
        if self.generated is not None and name in self.generated:
            return self.generated[name]
        t = getattr(self, name)
        for axis, sel in enumerate(sels):
            t = _take(t, sel, axis)
        return t

    def selections(self) -> dict[str, tuple]:
        """Per parameter, the selection of each leading dimension."""
        return {"weight": (self.out_sel,), "bias": (self.out_sel,)}


class DynamicConv2d(_Dynamic, nn.Conv2d):
    def selections(self) -> dict[str, tuple]:
        return {"weight": (self.out_sel, self.in_sel if self.groups == 1 else None), "bias": (self.out_sel,)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sels = self.selections()
        w = self.sliced("weight", *sels["weight"])
        groups = w.shape[0] if self.groups > 1 and self.groups == self.in_channels else self.groups
        return F.conv2d(x, w, self.sliced("bias", *sels["bias"]), self.stride, self.padding, self.dilation, groups)


class DynamicLinear(_Dynamic, nn.Linear):
    def selections(self) -> dict[str, tuple]:
        return {"weight": (self.out_sel, self.in_sel), "bias": (self.out_sel,)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sels = self.selections()
        return F.linear(x, self.sliced("weight", *sels["weight"]), self.sliced("bias", *sels["bias"]))


class DynamicBatchNorm2d(_Dynamic, nn.BatchNorm2d):
    """Batch statistics in training. Running statistics are only updated when `track` is on:
    at the full config while training, and during BN recalibration of one config."""

    track = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel = self.out_sel
        w, b = self.sliced("weight", sel), self.sliced("bias", sel)
        if not self.training:
            return F.batch_norm(x, _take(self.running_mean, sel, 0), _take(self.running_var, sel, 0),
                                w, b, False, 0.0, self.eps)
        if not self.track:
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mean, var = _take(self.running_mean, sel, 0), _take(self.running_var, sel, 0)
        out = F.batch_norm(x, mean, var, w, b, True, momentum, self.eps)
        if isinstance(sel, torch.Tensor):  # an index selection copies: write the statistics back
            with torch.no_grad():
                self.running_mean[sel], self.running_var[sel] = mean, var
        return out


DYNAMIC = {nn.Conv2d: DynamicConv2d, nn.Linear: DynamicLinear, nn.BatchNorm2d: DynamicBatchNorm2d}
PLAIN = {v: k for k, v in DYNAMIC.items()}


class _Dim:
    """One layer dimension: which of its indices each group's first k channels cover."""

    def __init__(self, size: int):
        self.size = size
        self.parts: list[tuple[int, np.ndarray, np.ndarray]] = []  # group, idxs sorted by root, roots

    def selection(self, widths: np.ndarray, full: np.ndarray):
        if all(widths[g] == full[g] for g, _, _ in self.parts):
            return None
        covered = np.zeros(self.size, dtype=bool)
        keep = np.zeros(self.size, dtype=bool)
        for g, idxs, roots in self.parts:
            covered[idxs] = True
            keep[idxs[: np.searchsorted(roots, widths[g])]] = True
        keep |= ~covered
        kept = np.flatnonzero(keep)
        if len(kept) and kept[-1] == len(kept) - 1:
            return slice(0, len(kept))  # a prefix: slicing gives views, no copies
        return torch.from_numpy(kept)


class Supernet(nn.Module):
    """A model whose layers run at any channel config of `space` (weight sharing).

    `set_config` chooses the widths; the forward pass is the model's own. `extract` returns
    the standalone pruned model of a config, with outputs equal to the supernet's there.
    """

    method = "supernet"

    def __init__(self, model: nn.Module, space: ChannelSpace):
        super().__init__()
        self.model = model
        self.space = space
        self.card = getattr(model, "card", None)
        graph = dependency_graph(model.eval(), example_input(space.input_size[-1], model))
        names = {m: n for n, m in model.named_modules()}
        self.layer_dims: dict[tuple[str, str], _Dim] = {}
        for gi, g in enumerate(space.groups):
            group = pruning_group(graph, model, g.name, list(range(g.max)))
            for item in group.items:
                module = item.dep.target.module
                if module not in names:
                    continue
                if type(module) not in DYNAMIC:
                    raise CompressError(
                        f"layer '{names[module]}' ({type(module).__name__}) is in channel group '{g.name}', "
                        "but supernets slice only Conv2d, BatchNorm2d and Linear layers. Replace it, or keep "
                        "its channels fixed (exclude the group).")
                kind = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
                size = _size(module, kind)
                idxs, roots = np.array(item.idxs, dtype=np.int64), np.array(item.root_idxs, dtype=np.int64)
                order = np.argsort(roots, kind="stable")
                self.layer_dims.setdefault((names[module], kind), _Dim(size)).parts.append(
                    (gi, idxs[order], roots[order]))
        for module in model.modules():
            if type(module) in DYNAMIC:
                module.__class__ = DYNAMIC[type(module)]
        self._full = space.vector(space.max())
        self.config = space.max()

    @torch.no_grad()
    def set_config(self, config: Mapping[str, int], track: bool = True) -> None:
        """Run at `config` from now on. `track` lets BN update running statistics in training."""
        config = self.space.validate(config)
        widths = self.space.vector(config)
        for (name, kind), dim in self.layer_dims.items():
            setattr(self.model.get_submodule(name), f"{kind}_sel", dim.selection(widths, self._full))
        for module in self.model.modules():
            if isinstance(module, DynamicBatchNorm2d):
                module.track = track
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def plain_copy(self) -> nn.Module:
        """The full-width model with the supernet's current weights as plain layers."""
        model = copy.deepcopy(self.model)
        for module in model.modules():
            if type(module) in PLAIN:
                module.__class__ = PLAIN[type(module)]
                for attr in ("out_sel", "in_sel", "generated", "track"):
                    module.__dict__.pop(attr, None)
        return model.requires_grad_(True)

    @torch.no_grad()
    def extract(self, config: Mapping[str, int]) -> nn.Module:
        """The standalone pruned model of `config` (eval mode), carrying the base model's card."""
        config = self.space.validate(config)
        pruned = prune(self.plain_copy().eval(), config, self.space, importance="first")
        if self.card is not None:
            pruned.card = self.card.replace(config=config.to_dict(), space=self.space.settings())
        return pruned.eval()


def _size(module: nn.Module, kind: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels if kind == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if kind == "out" else module.in_features
    return module.num_features


def recalibrate_bn(supernet: Supernet, config: Mapping[str, int], batches, device="cpu") -> None:
    """Recompute BN running statistics for `config` over `batches`, as US-Nets and
    MetaPruning do after training; leaves the supernet in eval mode at `config`."""
    supernet.set_config(config, track=True)
    recalibrate(supernet, batches, device)
