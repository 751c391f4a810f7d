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
            rtol: float = RTOL, labels: torch.Tensor | None = None) -> dict:
    """Max absolute logit difference and top-1 agreement (and, with `labels`, the top-1
    accuracy of both). Raises CheckFailed when the difference exceeds `tolerance` + `rtol` x
    the largest |logit|: float32 runtimes sum in different orders, so logits of size 20
    legitimately differ by ~1e-4."""
    diff = float(np.abs(reference - exported).max())
    scale = float(np.abs(reference).max())
    agree = float((reference.argmax(1) == exported.argmax(1)).mean())
    report = {"max_abs_diff": diff, "max_abs_logit": scale, "top1_agreement": agree, "images": int(len(reference))}
    if labels is not None:
        truth = labels.numpy()
        report["accuracy"] = {"float": float((reference.argmax(1) == truth).mean()),
                              "exported": float((exported.argmax(1) == truth).mean())}
    if tolerance is not None:
        limit = tolerance + rtol * scale
        report["limit"] = limit
        if not diff <= limit:
            raise CheckFailed(f"{name}: outputs differ from PyTorch by up to {diff:.3g} (allowed {limit:.3g} = "
                              f"tolerance {tolerance:g} + {rtol:g} x largest |logit| {scale:.3g}; top-1 agreement "
                              f"{agree:.1%} on {len(reference)} images). The file was written; inspect it, or "
                              "raise `tolerance` if this precision is acceptable.", report)
    return report


def check_agreement(name: str, report: dict, floor: float, mode: str) -> None:
    """CheckFailed (carrying `report`) when a quantized file's top-1 agreement with the
    float model is under `floor`."""
    p = report["parity"]
    if p["top1_agreement"] < floor:
        accuracy = p.get("accuracy")
        drop = (f"; top-1 accuracy {accuracy['float']:.1%} float, {accuracy['exported']:.1%} {mode}"
                if accuracy else "")
        raise CheckFailed(f"{name}: {mode} top-1 agrees with the float model on {p['top1_agreement']:.1%} of "
                          f"{p['images']} images, under the required {floor:.1%}{drop}. The file was written. "
                          "Calibrate on more (and more representative) images (`calib_images`), keep the most "
                          "sensitive ops in float (`keep_float`), or lower `min_agreement`.", report)


@torch.no_grad()
def torch_logits(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    return model.eval()(images).float().numpy()
