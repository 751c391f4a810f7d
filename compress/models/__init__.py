"""The model zoo: zoo names -> models carrying their card."""
from __future__ import annotations

from torch import nn

from compress.card import ModelCard, attach
from compress.models.zoo import ZOO, ZooEntry, build_model, zoo_entry

__all__ = ["ZOO", "ZooEntry", "build", "build_model", "zoo_entry"]


def build(name: str, num_classes: int | None = None, width_mult: float = 1.0,
          pretrained: str | None = None, input_size: int | None = None) -> nn.Module:
    """A zoo model carrying its card (arch, input size, mean/std, classes)."""
    entry = zoo_entry(name)
    model = build_model(name, num_classes=num_classes, width_mult=width_mult, pretrained=pretrained)
    num_classes = entry.num_classes if num_classes is None else num_classes
    return attach(model, ModelCard(
        arch={"zoo": name, "kwargs": {"num_classes": num_classes, "width_mult": width_mult}},
        input_size=input_size or entry.input_size, num_classes=num_classes, mean=entry.mean, std=entry.std,
        source=f"{name}" + (f" ({pretrained} weights)" if pretrained else "")))
