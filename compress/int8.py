"""The int8 grid the exporters quantize to (LiteRT's quantizer and ONNX Runtime's alike), in
PyTorch: the export's bias correction and the fine-tune's quantization-aware recovery both
round to it, so what they see is what the int8 file computes.

Weights: symmetric per output channel, [-127, 127] x scale with scale = max |w| / 127, on the
weight after the following BatchNorm is folded into it (as the converters fold it).
Activations: per tensor, asymmetric [-128, 127] over a range stretched to include zero.
"""
from __future__ import annotations

import torch
from torch import nn

WEIGHT_LEVELS = 127


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, nn.BatchNorm2d | None]]:
    """Every conv and linear layer, with the BatchNorm that consumes its output directly (as
    a converter folds it), found by running the model once."""
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # the tensor is kept so its id stays unique
    found: dict[nn.Module, nn.BatchNorm2d | None] = {}

    def produced(m, args, out):
        outputs[id(out)] = (m, out)
        found.setdefault(m, None)

    def consumed(m, args):
        if id(args[0]) in outputs:
            found[outputs[id(args[0])][0]] = m
    hooks = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(produced))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(consumed))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return list(found.items())


def bn_fold(weight: torch.Tensor, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """The per-output-channel factor that folding `bn` (eval statistics) multiplies `weight`
    by, shaped to broadcast over it; 1 where there is no BN or the factor is 0."""
    if bn is None:
        fold = torch.ones(weight.shape[0], device=weight.device, dtype=weight.dtype)
    else:
        fold = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        fold = torch.where(fold == 0, torch.ones_like(fold), fold)
    return fold.view(-1, *[1] * (weight.dim() - 1))


def weight_on_grid(weight: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
    """`weight` moved onto the per-channel int8 grid of `weight * fold` (then unfolded), with
    a straight-through gradient."""
    folded = weight * fold
    scale = (folded.detach().abs().amax(tuple(range(1, weight.dim()))) / WEIGHT_LEVELS).clamp_min(1e-12)
    zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(folded, scale.float(), zero, 0, -WEIGHT_LEVELS,
                                                  WEIGHT_LEVELS) / fold


def activation_on_grid(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """`x` rounded onto the int8 grid of the range [low, high] (stretched to include 0) and
    clipped to it, with a straight-through gradient inside the range."""
    low, high = torch.clamp(low, max=0.0), torch.clamp(high, min=0.0)
    scale = ((high - low) / 255.0).clamp_min(1e-9)
    zero = torch.clamp(torch.round(-128.0 - low / scale), -128, 127).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x, scale.float().reshape(()), zero.reshape(()), -128, 127)
