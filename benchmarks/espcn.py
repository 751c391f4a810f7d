"""ESPCN (Shi et al. 2016), the kind of super-resolution net a user brings as their own code:
`benchmarks/espcn.py:espcn` is a model source (features at low resolution, a sub-pixel
convolution: a conv to 3 x r^2 channels and a PixelShuffle), declared `task: restore`."""
from __future__ import annotations

from torch import nn


class ESPCN(nn.Module):
    def __init__(self, scale: int = 2, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 5, padding=2), nn.Tanh(),
                                  nn.Conv2d(width, width // 2, 3, padding=1), nn.Tanh(),
                                  nn.Conv2d(width // 2, 3 * scale * scale, 3, padding=1))
        self.up = nn.PixelShuffle(scale)

    def forward(self, x):
        return self.up(self.body(x))


def espcn(num_classes: int = 3, scale: int = 2) -> ESPCN:
    """num_classes: the output image's channels (3; the model sources' common argument)."""
    if num_classes != 3:
        raise ValueError(f"ESPCN outputs RGB images: num_classes must be 3, got {num_classes}")
    return ESPCN(scale)
