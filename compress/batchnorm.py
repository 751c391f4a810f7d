"""Re-estimating BatchNorm statistics: after pruning, or for one config of a supernet, the
stored running mean and variance describe a network that no longer exists."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def recalibrate(model: nn.Module, batches, device: str | torch.device = "cpu", limit: int | None = None) -> None:
    """Reset every BN layer's running statistics and recompute them as a cumulative average
    over `batches` (image tensors or (images, labels) pairs, e.g. a DataLoader), stopping once
    `limit` images have passed; leaves `model` in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for batch in batches:
            if limit is not None and seen >= limit:
                break
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images.to(device, non_blocking=True))
            seen += len(images)
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum
        model.eval()
