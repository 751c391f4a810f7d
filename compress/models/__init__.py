"""The model zoo and model sources: names -> models carrying their card."""
from __future__ import annotations

from torch import nn

from compress.card import ModelCard, attach
from compress.errors import CompressError
from compress.models.zoo import ZOO, ZooEntry, build_model, zoo_entry

__all__ = ["ZOO", "ZooEntry", "build", "build_model", "zoo_entry"]


def build(name: str, num_classes: int | None = None, width_mult: float = 1.0,
          pretrained: str | None = None, input_size: int | None = None) -> nn.Module:
    """A zoo model carrying its card (arch, input size, mean/std, classes)."""
    entry = zoo_entry(name)
    model = build_model(name, num_classes=num_classes, width_mult=width_mult, pretrained=pretrained)
    # a user's factory is rebuilt the way it was called: with num_classes only when it was given
    kwargs = {"num_classes": num_classes if num_classes is not None else entry.num_classes, "width_mult": width_mult}
    classes = kwargs["num_classes"] or _head_classes(model, name)
    return attach(model, ModelCard(
        arch={"zoo": name, "kwargs": kwargs}, input_size=input_size or entry.input_size, num_classes=classes,
        mean=entry.mean, std=entry.std, source=f"{name}" + (f" ({pretrained} weights)" if pretrained else "")))


def _head_classes(model: nn.Module, name: str) -> int:
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise CompressError(f"'{name}' built a model without an nn.Linear head to read its class count from; give "
                            "num_classes (--num-classes).")
    return heads[-1].out_features
