"""Comparing an exported model's outputs with PyTorch's on the same inputs."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.card import card_of
from compress.errors import CheckFailed


def reference_inputs(model: nn.Module, images: torch.Tensor | None, count: int = 8, seed: int = 0) -> torch.Tensor:
    """The images to compare on: real ones when given, else a fixed random batch."""
    if images is not None:
        return images.float()
    size = card_of(model).input_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


RTOL = 1e-4


def compare(name: str, reference: np.ndarray, exported: np.ndarray, tolerance: float | None,
            rtol: float = RTOL) -> dict:
    """Max absolute logit difference and top-1 agreement. Raises CheckFailed when the
    difference exceeds `tolerance` + `rtol` x the largest |logit|: float32 runtimes sum in
    different orders, so logits of size 20 legitimately differ by ~1e-4."""
    diff = float(np.abs(reference - exported).max())
    scale = float(np.abs(reference).max())
    agree = float((reference.argmax(1) == exported.argmax(1)).mean())
    report = {"max_abs_diff": diff, "max_abs_logit": scale, "top1_agreement": agree, "images": int(len(reference))}
    if tolerance is not None:
        limit = tolerance + rtol * scale
        report["limit"] = limit
        if not diff <= limit:
            raise CheckFailed(f"{name}: outputs differ from PyTorch by up to {diff:.3g} (allowed {limit:.3g} = "
                              f"tolerance {tolerance:g} + {rtol:g} x largest |logit| {scale:.3g}; top-1 agreement "
                              f"{agree:.1%} on {len(reference)} images). The file was written; inspect it, or "
                              "raise `tolerance` if this precision is acceptable.")
    return report


@torch.no_grad()
def torch_logits(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    return model.eval()(images).float().numpy()
