"""A registry entry: how to build a model and the defaults its card records."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from compress.models.card import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class ZooEntry:
    """A buildable model: a zoo name or a model source (compress.models.sources)."""

    name: str
    build: Callable[..., nn.Module]
    input_size: int
    num_classes: int | None  # None: whatever a user's factory builds
    weights: str | None = None  # torchvision weights enum ("Class.MEMBER"), or "timm" for timm's own
    cifar: bool = False
    description: str = ""
    mean: tuple = field(default=IMAGENET_MEAN)
    std: tuple = field(default=IMAGENET_STD)
    task: str | None = "classify"  # None: read off the model's output (a user's factory)
