"""Slimmable supernet (US-Nets / AutoSlim): one set of weights, sliced to any config.

Training uses the sandwich rule (max, min and random configs each step, one optimizer
step) with in-place distillation (the max config teaches the others).
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from compress.models.card import card_of
from compress.pruning.importance import group_scores
from compress.pruning.space import ChannelConfig, ChannelSpace
from compress.pruning.graph import example_input
from compress.supernet.dynamic import Supernet
from compress.training.loop import Step


class Slimmable(Supernet):
    method = "slimmable"


def random_config(space: ChannelSpace, uniform: bool = False) -> ChannelConfig:
    """A random config drawn with torch's generator (so a resumed run draws the same ones):
    one width per group, or one width multiplier for all groups."""
    if uniform:
        ratio = space.min_ratio + (1 - space.min_ratio) * float(torch.rand(()))
        return space.uniform(ratio)
    return ChannelConfig({g.name: g.widths[int(torch.randint(len(g.widths), ()))] for g in space.groups})


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    return -(target_probs * nn.functional.log_softmax(logits, 1)).sum(1).mean()


def sandwich_step(supernet: Slimmable, num_random: int = 2, uniform: bool = False, distill: bool = True,
                  label_smoothing: float = 0.1, teacher: nn.Module | None = None) -> Step:
    """Max, min and `num_random` random configs per batch, their gradients averaged into one
    step. The max config learns from the labels; with `distill`, the others from its
    detached outputs (in-place distillation). Given a frozen `teacher` (the pretrained model the
    supernet started from), every config, the max one too, learns from the teacher's outputs
    instead: labels and in-place targets pull the shared weights away from what the pretrained
    model knew, the teacher's outputs pull them back."""
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    space = supernet.space
    if teacher is not None:
        teacher.eval().requires_grad_(False)

    def step(net, images, labels, backward):
        configs = [space.max(), space.min()] + [random_config(space, uniform) for _ in range(num_random)]
        target = main_loss = None
        if teacher is not None:
            with torch.no_grad():
                target = teacher.to(images.device)(images).softmax(1)
        for i, config in enumerate(configs):
            supernet.set_config(config, track=i == 0)  # BN statistics of the full config only
            last = i == len(configs) - 1
            sync = net.no_sync() if isinstance(net, DistributedDataParallel) and not last else contextlib.nullcontext()
            with sync:
                logits = net(images)
                # the teacher's outputs, or (after the max config) the max config's
                loss = soft_cross_entropy(logits, target) if target is not None else criterion(logits, labels)
                if i == 0:
                    main_loss = loss.detach()
                    if distill and teacher is None:
                        target = logits.detach().softmax(1)
                # averaged over the configs, so the learning rate means what it does for one network
                backward(loss / len(configs))
        supernet.set_config(space.max())
        return main_loss
    return step


@torch.no_grad()
def reorder_channels(supernet: Supernet, importance: str = "l1", batch=None) -> None:
    """Permute each group's channels by importance, most important first, so that the
    first-k slices of a pretrained model keep what matters. The full model's function is
    unchanged (every coupled layer is permuted alike). With the importance and images
    `prune` measures on (`batch`), a width-k slice holds exactly the channels `prune` keeps
    at width k, so a searched config can be cut from the unpruned model instead."""
    scores = group_scores(supernet.plain_copy(), supernet.space, importance, batch)
    perms = [np.argsort(-scores[g.name], kind="stable") for g in supernet.space.groups]
    for (name, kind), dim in supernet.layer_dims.items():
        module = supernet.model.get_submodule(name)
        for gi, idxs, _ in dim.parts:
            rows = idxs.reshape(len(perms[gi]), -1)  # a channel may span several indices (flatten)
            src, dst = torch.from_numpy(rows[perms[gi]].ravel()), torch.from_numpy(rows.ravel())
            for tensor, axis in _channel_tensors(module, kind):
                index = [slice(None)] * tensor.dim()
                index[axis] = src
                moved = tensor[tuple(index)].clone()
                index[axis] = dst
                tensor[tuple(index)] = moved


@torch.no_grad()
def ordered_copy(model: nn.Module, importance: str, batch) -> nn.Module:
    """A copy of `model` (function unchanged) with each group's channels most important
    first, as `reorder_channels` orders a slimmable supernet: what a PruningNet is fitted to
    (it generates weights, so it cannot be reordered after wrapping), so that either kind of
    supernet scores the channels `prune` keeps and a searched config can be cut from `model`."""
    space = ChannelSpace.from_model(model, example_input(card_of(model).input_size, model))
    supernet = Slimmable(copy.deepcopy(model), space)
    reorder_channels(supernet, importance, batch)
    return supernet.plain_copy().eval()


def _channel_tensors(module: nn.Module, kind: str):
    if isinstance(module, nn.BatchNorm2d):
        return [(t, 0) for t in (module.weight, module.bias, module.running_mean, module.running_var) if t is not None]
    if kind == "out":
        return [(t, 0) for t in (module.weight, module.bias) if t is not None]
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return []  # depthwise: its input channels are its output channels, moved with those
    return [(module.weight, 1)]
