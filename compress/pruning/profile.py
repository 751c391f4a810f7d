"""MACs and parameter counts: thop's count of a real model, and the per-group table."""
from __future__ import annotations

import contextlib
import io

import thop
import torch
from thop.profile import register_hooks
from thop.vision.basic_hooks import zero_ops
from torch import nn

from compress.models.card import card_of
from compress.models.zoo import build_model
from compress.pruning.space import ChannelSpace, widths_of
from compress.pruning.graph import example_input

# The papers' convention counts conv and linear MACs only: thop's rules for
# normalization, activation and pooling layers are replaced by zero.
_ZERO = {t: zero_ops for t in (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.Sigmoid, nn.GELU, nn.Dropout, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.Identity)}


def _rules(model: nn.Module) -> dict:
    """thop's rules, by exact type, extended to subclasses of the layers it knows (timm's own
    Linear, torchvision's LayerNorm2d): thop would count neither their MACs nor their params."""
    rules = dict(_ZERO)
    for module in model.modules():
        kind = type(module)
        if kind in rules or kind in register_hooks:
            continue
        base = next((b for b in (*_ZERO, *register_hooks) if isinstance(module, b)), None)
        if base is not None:
            rules[kind] = _ZERO.get(base) or register_hooks[base]
    return rules


def count(model: nn.Module, input_size: int | tuple, channels: int = 3) -> tuple[int, int]:
    """(MACs, params) of `model` on one image: MACs counted by thop (conv + linear), params
    as the model's parameters add up (thop's count leaves out those of modules it has no rule
    for, and of containers: a ConvNeXt block's layer scale)."""
    hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    param = next(model.parameters())
    x = torch.zeros(1, channels, *hw, device=param.device, dtype=param.dtype)
    was_training = model.training
    with contextlib.redirect_stdout(io.StringIO()):  # thop prints per-type notices
        macs, _ = thop.profile(model, inputs=(x,), custom_ops=_rules(model), verbose=False)
    # thop leaves its counters as buffers on every module; remove them so the
    # model's state_dict stays as it was.
    for m in model.modules():
        for key in ("total_ops", "total_params"):
            m._buffers.pop(key, None)
    model.train(was_training)
    return int(macs), sum(p.numel() for p in model.parameters())


def model_space(model: nn.Module, divisor: int = 8) -> ChannelSpace:
    """The channel space a model's widths are read against: its unpruned base architecture's
    when it is a pruned zoo checkpoint, else its own."""
    card = card_of(model)
    example = example_input(card.input_size)
    if card.pruned and "zoo" in card.arch:
        base = build_model(card.arch["zoo"], **card.arch.get("kwargs", {}))
        return ChannelSpace.from_model(base, example, **(card.space or {"divisor": divisor}))
    return ChannelSpace.from_model(model, example, divisor=divisor)


def profile_model(model: nn.Module, divisor: int = 8) -> dict:
    """MACs and params (thop) and each channel group's width against its maximum."""
    card = card_of(model)
    macs, params = count(model, card.input_size)
    space = model_space(model, divisor)
    widths = widths_of(model, space)
    return {"macs": macs, "params": params, "input_size": card.input_size,
            "num_classes": card.num_classes, "arch": card.arch,
            "groups": [{"name": g.name, "width": widths[g.name], "max": g.max, "min": g.min}
                       for g in space.groups]}
