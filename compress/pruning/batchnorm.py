"""Re-estimating BatchNorm statistics: after pruning, or for one config of a supernet, the
stored running mean and variance describe a network that no longer exists."""
from __future__ import annotations

import torch
from torch import nn

from compress.pruning.moments import ChannelMoments


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


@torch.no_grad()
def fold_statistics(model: nn.Module, batches, device: str | torch.device = "cpu") -> None:
    """Set every BN's running statistics to what its input really has under the model's own
    eval-mode function on `batches`, and fold the change into its affine parameters so that
    function stays exactly as it was. After a refit, train-mode BN (a fine-tune) then
    normalizes as the network already does, instead of rescaling channels whose refitted
    outputs have less variance than the unpruned ones the old statistics describe."""
    moments = {m: ChannelMoments() for m in model.modules()
               if isinstance(m, nn.BatchNorm2d) and m.track_running_stats}
    handles = [m.register_forward_hook(lambda module, inputs, _: moments[module].add(inputs[0])) for m in moments]
    model.eval()
    try:
        for batch in batches:
            model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
    finally:
        for h in handles:
            h.remove()
    for m, seen in moments.items():
        if not seen.n:
            continue
        mean, var = seen.mean, seen.variance
        old_std = (m.running_var.double() + m.eps).sqrt()
        new_std = (var + m.eps).sqrt()
        gamma = m.weight.double() if m.affine else torch.ones_like(mean)
        if m.affine:
            m.bias.add_((gamma * (mean - m.running_mean.double()) / old_std).to(m.bias))
            m.weight.copy_((gamma * new_std / old_std).to(m.weight))
        m.running_mean.copy_(mean.to(m.running_mean))
        m.running_var.copy_(var.to(m.running_var))
