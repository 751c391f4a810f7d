"""A model's outputs as named tensors: one tensor (a classifier's logits), or a dict, list or
tuple of them (a segmenter's {"out", "aux"}, a detector's head outputs), in one fixed order
that every runtime's file and every comparison share."""
from __future__ import annotations

import torch
from torch import nn



def named_tensors(out, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of `out`, depth first, named by its dict keys and list positions
    ("out", "aux", "0.boxes"); a plain tensor is "logits"."""
    if isinstance(out, torch.Tensor):
        return [(prefix or "logits", out)]
    if isinstance(out, dict):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(out)]
    else:
        return []
    return [pair for key, value in items for pair in named_tensors(value, f"{prefix}.{key}" if prefix else key)]


class FlatOutputs(nn.Module):
    """`model` returning a tuple of its output tensors, in `named_tensors`' order (the
    exporters trace tensors, not dicts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for _, t in named_tensors(self.model(x)))
