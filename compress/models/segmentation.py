"""LRASPP on MobileNetV2: torchvision's Lite R-ASPP head (Searching for MobileNetV3, Howard et
al.) on torchvision's MobileNetV2 features, so an ImageNet MobileNetV2 checkpoint gives it its
backbone (the `features.*` weights load as they are)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.segmentation.lraspp import LRASPPHead

LOW = 6  # the last block at stride 8 (32 channels): the head's fine branch


class LRASPPMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 21, width_mult: float = 1.0, inter_channels: int = 128):
        super().__init__()
        self.features = tvm.mobilenet_v2(width_mult=width_mult).features
        self.head = LRASPPHead(self.features[LOW].out_channels, self.features[-1].out_channels, num_classes,
                               inter_channels)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        low = None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == LOW:
                low = x
        out = self.head({"low": low, "high": x})
        return {"out": nn.functional.interpolate(out, size=size, mode="bilinear", align_corners=False)}
