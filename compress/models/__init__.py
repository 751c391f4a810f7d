"""The model zoo and model sources: names -> models carrying their card."""
from __future__ import annotations

from torch import nn

from compress.models.card import IMAGENET_MEAN, ModelCard, attach, classes_of, infer_task
from compress.models.entry import ZooEntry
from compress.models.zoo import ZOO, build_model, zoo_entry

__all__ = ["ZOO", "ZooEntry", "build", "build_model", "zoo_entry"]


def build(name: str, num_classes: int | None = None, width_mult: float = 1.0,
          pretrained: str | None = None, input_size: int | None = None, task: str | None = None) -> nn.Module:
    """A zoo model carrying its card (arch, input size, mean/std, classes, task: read off its
    output unless given)."""
    entry = zoo_entry(name)
    model = build_model(name, num_classes=num_classes, width_mult=width_mult, pretrained=pretrained)
    size = input_size or entry.input_size
    task = task or entry.task or infer_task(model, size)
    # a restore model takes plain [0, 1] pixels unless its entry says otherwise, as its targets are
    restore = task == "restore" and entry.mean == IMAGENET_MEAN
    mean, std = ((0.0,) * 3, (1.0,) * 3) if restore else (entry.mean, entry.std)
    # a user's factory is rebuilt the way it was called: with num_classes only when it was given
    kwargs = {"num_classes": num_classes if num_classes is not None else entry.num_classes, "width_mult": width_mult}
    return attach(model, ModelCard(
        arch={"zoo": name, "kwargs": kwargs}, input_size=size, num_classes=kwargs["num_classes"] or classes_of(
            model, size, task, name), mean=mean, std=std, task=task,
        source=f"{name}" + (f" ({pretrained} weights)" if pretrained else "")))
