"""Super-resolution pairs from any image set (`sr:SPEC:xN`): each image's high-resolution
crop is the target and its bicubic downscaling by N the input, as the SR literature makes its
training pairs (DIV2K's bicubic track). Targets stay in [0, 1]; inputs are normalised with the
model's mean/std (a restore model's card usually says 0 and 1: plain [0, 1] pixels)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from compress.errors import CompressError


def parse_scale(location: str) -> tuple[str, int]:
    """`cifar10:DIR:x2` -> ("cifar10:DIR", 2)."""
    inner, _, scale = location.rpartition(":")
    if not inner or not scale.startswith("x") or not scale[1:].isdigit() or int(scale[1:]) < 2:
        raise CompressError(f"bad data spec 'sr:{location}': sr:SPEC:xN takes an image set and an upscaling factor "
                            "of 2 or more, e.g. sr:cifar10:../shared/data/cifar10:x2 or sr:imagefolder:/data/div2k:x4.")
    return inner, int(scale[1:])


class PairSet(Dataset):
    """(low-resolution input, high-resolution target) pairs cut from `images` (a dataset of
    images, labels ignored). The input is `input_size` pixels square, the target `scale` times
    that; training crops at random and flips, evaluation crops the centre."""

    def __init__(self, images: Dataset, scale: int):
        self.images, self.scale = images, scale
        self.crop = None
        self.normalize = None

    def configure(self, train: bool, input_size: int, mean, std) -> None:
        side = input_size * self.scale
        resize = v2.Resize(side, antialias=True)  # images smaller than a target crop are scaled up first
        self.crop = v2.Compose([resize, v2.RandomCrop(side), v2.RandomHorizontalFlip()] if train
                               else [resize, v2.CenterCrop(side)])
        self.input_size = input_size
        self.normalize = v2.Normalize(list(mean), list(std))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = v2.functional.to_dtype(v2.functional.to_image(self.images[i][0]), torch.float32, scale=True)
        target = self.crop(image)
        low = v2.functional.resize(target, [self.input_size] * 2, interpolation=v2.InterpolationMode.BICUBIC,
                                   antialias=True).clamp(0, 1)
        return self.normalize(low), target
