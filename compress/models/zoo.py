"""Model registry: zoo names -> builders, with the defaults a checkpoint records."""
from __future__ import annotations

import difflib
from typing import Callable

from torch import nn
from torchvision import models as tvm

from compress.errors import CompressError
from compress.models.detection import fcos_mobilenet_v2
from compress.models.entry import ZooEntry
from compress.models.mobilenet_v1 import MobileNetV1
from compress.models.pretrained import load_pretrained
from compress.models.segmentation import LRASPPMobileNetV2
from compress.models.sources import is_source, source_entry


def _cifar_strides(model: nn.Module) -> nn.Module:
    """The usual CIFAR adaptation: stride-1 stem and one less downsampling.

    The first conv gets stride 1, and so does the first later conv with stride
    2, so a 32x32 input leaves the feature extractor at 4x4 instead of 1x1.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    convs[0].stride = (1, 1)
    for conv in convs[1:]:
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
            break
    return model


def _tv(fn: Callable[..., nn.Module], cifar: bool = False) -> Callable[..., nn.Module]:
    def build(num_classes: int, width_mult: float = 1.0) -> nn.Module:
        model = fn(weights=None, num_classes=num_classes, width_mult=width_mult)
        return _cifar_strides(model) if cifar else model
    return build


def _v1(cifar: bool = False) -> Callable[..., nn.Module]:
    def build(num_classes: int, width_mult: float = 1.0) -> nn.Module:
        model = MobileNetV1(num_classes=num_classes, width_mult=width_mult)
        return _cifar_strides(model) if cifar else model
    return build


def _v2_segmenter(num_classes: int, width_mult: float = 1.0) -> nn.Module:
    return LRASPPMobileNetV2(num_classes=num_classes, width_mult=width_mult)


_ENTRIES = [
    ZooEntry("mobilenet_v1", _v1(), 224, 1000, None, description="MobileNetV1 (defined here)"),
    ZooEntry("mobilenet_v2", _tv(tvm.mobilenet_v2), 224, 1000, "MobileNet_V2_Weights.IMAGENET1K_V1",
             description="torchvision MobileNetV2"),
    ZooEntry("mobilenet_v3_large", _tv(tvm.mobilenet_v3_large), 224, 1000,
             "MobileNet_V3_Large_Weights.IMAGENET1K_V1", description="torchvision MobileNetV3-Large"),
    ZooEntry("mobilenet_v3_small", _tv(tvm.mobilenet_v3_small), 224, 1000,
             "MobileNet_V3_Small_Weights.IMAGENET1K_V1", description="torchvision MobileNetV3-Small"),
]
_ENTRIES += [ZooEntry("lraspp_mobilenet_v2", _v2_segmenter, 512, 21, "MobileNet_V2_Weights.IMAGENET1K_V1",
                      description="LRASPP head on MobileNetV2 (segmentation; ImageNet weights for the backbone)",
                      task="segment"),
             ZooEntry("fcos_mobilenet_v2", fcos_mobilenet_v2, 320, 91, "MobileNet_V2_Weights.IMAGENET1K_V1",
                      description="FCOS on MobileNetV2, a 64-channel FPN (detection; ImageNet weights for the "
                                  "backbone)", task="detect")]
_ENTRIES += [
    ZooEntry(e.name + "_cifar", _v1(True) if e.name == "mobilenet_v1" else
             _tv(getattr(tvm, e.name), cifar=True), 32, 10, e.weights, cifar=True,
             description=e.description + ", CIFAR strides (32x32)")
    for e in list(_ENTRIES) if e.task == "classify"
]
ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def zoo_entry(name: str) -> ZooEntry:
    """The entry of a zoo name or of a model source (torchvision:NAME, timm:NAME, file.py:factory)."""
    if is_source(name):
        return source_entry(name)
    if name not in ZOO:
        close = difflib.get_close_matches(name, ZOO, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise CompressError(f"unknown model '{name}'.{hint} Known zoo models: {', '.join(ZOO)} "
                            "(`chansearch models` lists them); any other model is named by its source "
                            "(torchvision:resnet50, timm:efficientnet_lite0, path/to/file.py:factory or "
                            "package.module:factory), or pass a checkpoint file path.")
    return ZOO[name]


def build_model(name: str, num_classes: int | None = None, width_mult: float = 1.0,
                pretrained: str | None = None) -> nn.Module:
    """Build a zoo model or a model source; `pretrained` is None, "torchvision", "timm" or a
    local file path."""
    entry = zoo_entry(name)
    if width_mult <= 0:
        raise CompressError(f"`width_mult` must be positive, got {width_mult}.")
    num_classes = entry.num_classes if num_classes is None else num_classes
    model = entry.build(num_classes=num_classes, width_mult=width_mult)
    if pretrained:
        load_pretrained(model, entry, pretrained, width_mult)
    return model

