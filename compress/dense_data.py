"""Segmentation data: images with a class per pixel (255: ignored), transformed jointly.

- `voc:DIR`: a VOC-style folder (DIR/JPEGImages/ID.jpg, DIR/SegmentationClass/ID.png with the
  class index per pixel, DIR/ImageSets/Segmentation/train.txt and val.txt listing the IDs), as
  PASCAL VOC 2012 ships it and as most segmentation sets can be laid out;
- `shapes:N`: N generated images of circles, rectangles and triangles on noisy backgrounds,
  their masks (4 classes with the background) and boxes: a set a MobileNet head learns in
  minutes on 2 CPU cores, for tests and quick benchmarks (N/4 more make the evaluation split).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from compress.errors import CompressError
from compress.tasks import IGNORE

SHAPE_CLASSES = ["background", "circle", "rectangle", "triangle"]


def shapes(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """`count` images (uint8 N,size,size,3), their masks (uint8 N,size,size) and boxes (per
    image, rows of x1, y1, x2, y2, class), drawn with `seed`; later shapes cover earlier ones."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.empty((count, size, size, 3), np.uint8)
    masks = np.zeros((count, size, size), np.uint8)
    boxes = []
    for i in range(count):
        image = rng.integers(0, 256, 3) + rng.normal(0, 25, (size, size, 3))
        drawn = []
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, 4))
            r = rng.uniform(0.12, 0.28) * size
            cx, cy = rng.uniform(r, size - r, 2)
            if cls == 1:
                inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            elif cls == 2:
                inside = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= 0.6 * r)
            else:
                inside = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - cy + r) / 2)
            image[inside] = rng.integers(0, 256, 3) + rng.normal(0, 10, (int(inside.sum()), 3))
            masks[i][inside] = cls
            drawn.append(cls)
        images[i] = np.clip(image, 0, 255).astype(np.uint8)
        rows = []
        for cls in sorted(set(drawn)):  # boxes of what stays visible of each class
            ys, xs = np.nonzero(masks[i] == cls)
            if len(xs):
                rows.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, cls])
        boxes.append(np.array(rows, np.float32).reshape(-1, 5))
    return images, masks, boxes


def transforms(train: bool, size: int, mean, std) -> v2.Compose:
    """Image and mask alike: resized to size x size (the mask by nearest neighbour), flipped
    at random for training; the image scaled and normalised, the mask made int64."""
    return v2.Compose([v2.Resize((size, size), antialias=True), *([v2.RandomHorizontalFlip()] if train else []),
                       v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
                       v2.Normalize(list(mean), list(std))])


class SegmentationSet(Dataset):
    """Images and their masks; `read(i)` gives both as uint8 (H, W, 3) and (H, W) arrays."""

    transform = None
    classes: list[str] = []

    def __getitem__(self, i: int):
        image, mask = self.read(i)
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask.as_subclass(torch.Tensor).long()

    def check_classes(self, num_classes: int, source: str) -> None:
        """Refuse labels the model has no class for (255 is 'ignore'), on up to 32 masks."""
        if len(self) == 0:
            raise CompressError(f"{source} holds no images.")
        for i in np.linspace(0, len(self) - 1, min(32, len(self))).astype(int):
            labels = np.unique(self.read(int(i))[1])
            labels = labels[labels != IGNORE]
            if len(labels) and labels.max() >= num_classes:
                raise CompressError(f"{source} has pixel label {labels.max()} but the model has {num_classes} "
                                    "classes; set `num_classes` or use a matching model.")


class ShapesSet(SegmentationSet):
    classes = SHAPE_CLASSES

    def __init__(self, count: int, size: int, train: bool):
        self.images, self.masks, self.boxes = shapes(count if train else max(8, count // 4), size, 0 if train else 1)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int):
        return self.images[i], self.masks[i]


class VOCFolder(SegmentationSet):
    def __init__(self, root: Path, train: bool):
        listing = root / "ImageSets" / "Segmentation" / ("train.txt" if train else "val.txt")
        for needed in (root / "JPEGImages", root / "SegmentationClass", listing):
            if not needed.exists():
                raise CompressError(f"'{root}' is not a VOC-style segmentation folder: '{needed}' is missing (it needs "
                                    "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/train.txt, val.txt).")
        self.root = root
        self.ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, i: int):
        from PIL import Image
        name = self.ids[i]
        try:
            with Image.open(self.root / "JPEGImages" / f"{name}.jpg") as image, \
                    Image.open(self.root / "SegmentationClass" / f"{name}.png") as mask:
                return np.array(image.convert("RGB")), np.array(mask)
        except OSError as exc:
            raise CompressError(f"cannot read image or mask '{name}' of '{self.root}': {exc}") from None
