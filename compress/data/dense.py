"""Dense data: images with a class per pixel (255: ignored) or with boxes, transformed jointly.

Segmentation:
- `voc:DIR`: a VOC-style folder (DIR/JPEGImages/ID.jpg, DIR/SegmentationClass/ID.png with the
  class index per pixel, DIR/ImageSets/Segmentation/train.txt and val.txt listing the IDs), as
  PASCAL VOC 2012 ships it and as most segmentation sets can be laid out;
- `shapes:N`: N generated images of circles, rectangles and triangles on noisy backgrounds,
  and their masks (4 classes with the background): a set a MobileNet head learns in minutes
  on 2 CPU cores, for tests and quick benchmarks (N/4 more make the evaluation split).
Detection:
- `coco:DIR`: COCO-format annotations, DIR/annotations/instances_{train,val}.json with the
  images in DIR/train and DIR/val (COCO 2017's own names, train2017 and val2017, also work);
  labels are the category ids;
- `shapeboxes:N`: the shapes with one box per class present (labels 1-3, 0 is background).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from compress.errors import CompressError

IGNORE = 255  # a pixel label that counts for nothing (VOC's object borders)

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


class DetectionSet(Dataset):
    """Images and their boxes; `read(i)` gives a uint8 (H, W, 3) image, boxes (k, 4) as
    x1, y1, x2, y2 in pixels, and k integer labels."""

    transform = None
    classes: list[str] = []

    def __getitem__(self, i: int):
        image, boxes, labels = self.read(i)
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        target = {"boxes": tv_tensors.BoundingBoxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                                    format="XYXY", canvas_size=tuple(image.shape[-2:])),
                  "labels": torch.as_tensor(labels, dtype=torch.int64)}
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]}

    @staticmethod
    def collate(batch: list) -> tuple[torch.Tensor, list[dict]]:
        """Images stacked, targets kept as a list: each image has its own number of boxes."""
        return torch.stack([image for image, _ in batch]), [target for _, target in batch]

    def check_classes(self, num_classes: int, source: str) -> None:
        if len(self) == 0:
            raise CompressError(f"{source} holds no images.")
        for i in np.linspace(0, len(self) - 1, min(32, len(self))).astype(int):
            labels = np.asarray(self.read(int(i))[2])
            if len(labels) and (labels.max() >= num_classes or labels.min() < 1):
                raise CompressError(f"{source} has box label {labels.max() if labels.max() >= num_classes else 0}; "
                                    f"labels run from 1 to {num_classes - 1} (0 is the background of a "
                                    f"{num_classes}-class detector): set `num_classes` or check the annotations.")


def box_transforms(train: bool, size: int, mean, std) -> v2.Compose:
    """Image and boxes alike: resized to size x size, flipped at random for training, boxes
    left empty by the crop dropped; the image scaled and normalised."""
    return v2.Compose([v2.Resize((size, size), antialias=True), *([v2.RandomHorizontalFlip()] if train else []),
                       v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                       v2.Normalize(list(mean), list(std)), v2.SanitizeBoundingBoxes(min_size=1)])


class ShapeBoxes(DetectionSet):
    classes = SHAPE_CLASSES

    def __init__(self, count: int, size: int, train: bool):
        self.images, _, self.boxes = shapes(count if train else max(8, count // 4), size, 0 if train else 1)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int):
        return self.images[i], self.boxes[i][:, :4], self.boxes[i][:, 4].astype(np.int64)


class CocoFolder(DetectionSet):
    def __init__(self, root: Path, train: bool):
        from pycocotools.coco import COCO
        split = "train" if train else "val"
        found = [(root / "annotations" / f"instances_{name}.json", root / name)
                 for name in (split, f"{split}2017") if (root / "annotations" / f"instances_{name}.json").is_file()]
        if not found:
            raise CompressError(f"'{root}' is not a COCO-format folder: it needs annotations/instances_{split}.json "
                                f"and the images in {split}/ (or COCO 2017's instances_{split}2017.json and "
                                f"{split}2017/).")
        annotations, self.images = found[0]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its loading times
            self.coco = COCO(str(annotations))
        self.ids = sorted(self.coco.imgs)

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, i: int):
        from PIL import Image
        info = self.coco.imgs[self.ids[i]]
        anns = [a for a in self.coco.imgToAnns.get(self.ids[i], []) if not a.get("iscrowd")]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], np.float32)
        try:
            with Image.open(self.images / info["file_name"]) as image:
                return np.array(image.convert("RGB")), boxes.reshape(-1, 4), [a["category_id"] for a in anns]
        except OSError as exc:
            raise CompressError(f"cannot read image '{info['file_name']}' of '{self.images}': {exc}") from None
