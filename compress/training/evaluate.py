"""A model's metric on a loader, as its task defines it (top-1/top-5 and loss; mIoU and pixel
accuracy), summed across ranks under DDP; with a teacher, the model's fidelity to it too."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from compress.data.source import to_device
from compress.models.card import ModelCard
from compress.training.tasks import Classify, task_of


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", progress: bool = False,
             distributed_sum: bool = True, teacher: nn.Module | None = None, task=None,
             per_image: bool = False) -> dict:
    """With `distributed_sum`, under torchrun, each rank passes its share of the data and
    all get the totals; without, each rank's result is its own. `task`: the model's own (its
    card's), or classification for a model without a card (a supernet). `per_image`: a
    classifier's result also holds `correct`, this rank's top-1 hit per image in loader order,
    and `losses`, its cross-entropy per image."""
    task = task or (task_of(model) if isinstance(getattr(model, "card", None), ModelCard) else Classify())
    model.eval()
    if teacher is not None:
        teacher.eval()
    meter = None
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress, unit="batch"):
        images, targets = images.to(device, non_blocking=True), to_device(targets, device)
        logits = task.logits(model(images))
        meter = meter or task.meter(logits, device)
        meter.update(logits, targets, task.logits(teacher(images)) if teacher is not None else None, images)
    meter = meter or task.meter(torch.zeros(1, 1), device)
    result = meter.result(distributed_sum)
    if per_image and getattr(meter, "correct", None):
        result["correct"] = torch.cat(meter.correct)
    if per_image and getattr(meter, "losses", None):
        result["losses"] = torch.cat(meter.losses)
    if per_image and getattr(meter, "divergence", None):
        result["divergence"] = torch.cat(meter.divergence)
    return result
