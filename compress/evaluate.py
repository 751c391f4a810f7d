"""Top-1 / top-5 accuracy and loss of a model on a loader (summed across ranks under DDP)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", progress: bool = False,
             distributed_sum: bool = True) -> dict:
    """With `distributed_sum`, under torchrun, each rank passes its share of the data and
    all get the totals; without, each rank's result is its own."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    batches = tqdm(loader, desc="eval", leave=False, disable=not progress, unit="batch")
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        sums += torch.stack([
            nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            hit[:, :1].sum().double(), hit.sum().double(),
            torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])
    if distributed_sum and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "images": int(n)}
