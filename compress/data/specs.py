"""Data specs -> torchvision datasets with standard transforms, and the held-out search split.

Specs: `cifar10:DIR` (the `cifar-10-batches-py` folder, or a folder with train.npz/test.npz),
`imagefolder:DIR` (ImageNet layout: DIR/train, DIR/val), `npz:FILE` (x uint8 (N,H,W,3) RGB,
y integer labels), `synthetic:N` (N random images, for smoke tests); for segmentation
`voc:DIR` and `shapes:N`, for detection `coco:DIR` and `shapeboxes:N` (compress.data.dense),
for super-resolution `sr:SPEC:xN` (any of those image sets as low/high-resolution pairs,
compress.data.pairs).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from compress.data.dense import (CocoFolder, DetectionSet, SegmentationSet, ShapeBoxes, ShapesSet, VOCFolder,
                                 box_transforms)
from compress.data.dense import transforms as dense_transforms
from compress.data.pairs import PairSet, parse_scale
from compress.errors import CompressError

SPEC_HELP = ("a data spec is cifar10:DIR, imagefolder:DIR, npz:FILE or synthetic:N for classification, voc:DIR "
             "or shapes:N for segmentation, coco:DIR or shapeboxes:N for detection, sr:SPEC:xN for super-resolution "
             "(e.g. cifar10:../shared/data/cifar10, sr:imagefolder:/data/div2k:x2)")
TARGETS = {"voc": "segment", "shapes": "segment", "coco": "detect", "shapeboxes": "detect",
           "sr": "restore"}  # else class labels


class ArrayDataset(Dataset):
    """uint8 images (N, H, W, 3) and integer labels held in memory."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform=None, classes: list[str] | None = None):
        self.x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # NCHW view, no copy
        self.y = torch.from_numpy(np.asarray(y).astype(np.int64))
        self.transform = transform
        self.classes = classes or [str(i) for i in range(int(self.y.max()) + 1 if len(self.y) else 0)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = v2.functional.to_image(self.x[i])
        return (self.transform(img) if self.transform else img), int(self.y[i])

    def labels(self) -> np.ndarray:
        return self.y.numpy()


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise CompressError(f"data file '{path}' does not exist.")
    try:
        with np.load(path) as f:
            keys = set(f.files)
            if not {"x", "y"} <= keys:
                raise CompressError(f"'{path}' must hold arrays 'x' (uint8 images N,H,W,3) and 'y' "
                                    f"(labels); it has {sorted(keys)}.")
            x, y = f["x"], f["y"]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CompressError(f"'{path}' is not a readable .npz file ({exc}).") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise CompressError(f"'{path}': 'x' must be uint8 of shape (N, H, W, 3), got "
                            f"{x.dtype} {x.shape}.")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise CompressError(f"'{path}': 'y' must be {len(x)} integer labels, got {y.dtype} {y.shape}.")
    if len(y) and y.min() < 0:
        raise CompressError(f"'{path}': labels must be >= 0, found {y.min()}.")
    return x, y


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _CIFAR10Folder(datasets.CIFAR10):
    """torchvision's reader of the standard `cifar-10-batches-py` folder, checking that the
    batch files exist rather than their MD5s, so re-packed copies of the folder load too."""

    def _check_integrity(self) -> bool:
        base = Path(self.root) / self.base_folder
        return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:  # the class names are fixed; batches.meta is not needed
        self.classes = list(CIFAR10_CLASSES)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


@dataclass(frozen=True)
class DataSpec:
    kind: str
    location: str

    @classmethod
    def parse(cls, spec: str) -> "DataSpec":
        kind, sep, loc = spec.partition(":")
        if not sep or kind not in ("cifar10", "imagefolder", "npz", "synthetic", *TARGETS) or not loc:
            raise CompressError(f"bad data spec '{spec}': {SPEC_HELP}.")
        if kind in ("synthetic", "shapes", "shapeboxes") and not loc.isdigit():
            raise CompressError(f"bad data spec '{spec}': {kind}:N takes an image count, e.g. {kind}:64.")
        if kind == "sr":
            cls.parse(parse_scale(loc)[0])
        return cls(kind, loc)

    @property
    def images(self) -> "DataSpec":
        """The spec of the images themselves (an sr: spec's inner one)."""
        return DataSpec.parse(parse_scale(self.location)[0]).images if self.kind == "sr" else self

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}"


def build_dataset(spec: str | DataSpec, train: bool, transform=None, num_classes: int = 10,
                  image_size: int = 32) -> Dataset:
    """The train or evaluation split of a data spec, with `transform` applied."""
    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    loc = Path(spec.location)
    if spec.kind == "sr":
        inner, scale = parse_scale(spec.location)
        return PairSet(build_dataset(inner, train, None, num_classes, image_size), scale)
    if spec.kind in ("shapes", "shapeboxes"):
        return (ShapesSet if spec.kind == "shapes" else ShapeBoxes)(int(spec.location), image_size, train)
    if spec.kind == "synthetic":
        n = int(spec.location)
        gen = np.random.default_rng(0 if train else 1)
        x = gen.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
        return ArrayDataset(x, gen.integers(0, num_classes, n), transform,
                            [str(i) for i in range(num_classes)])
    if spec.kind == "npz":
        return ArrayDataset(*_read_npz(loc), transform)
    if not loc.is_dir():
        raise CompressError(f"data folder '{loc}' (from data {spec}) does not exist.")
    if spec.kind in ("voc", "coco"):
        return (VOCFolder if spec.kind == "voc" else CocoFolder)(loc, train)
    if spec.kind == "cifar10":
        npz = loc / ("train.npz" if train else "test.npz")
        if npz.is_file():
            return ArrayDataset(*_read_npz(npz), transform, CIFAR10_CLASSES)
        root = loc.parent if loc.name == "cifar-10-batches-py" else loc
        if not (root / "cifar-10-batches-py").is_dir():
            raise CompressError(f"'{loc}' holds neither train.npz/test.npz nor the standard "
                                "cifar-10-batches-py folder (python version of CIFAR-10).")
        try:
            return _CIFAR10Folder(str(root), train=train, transform=transform, download=False)
        except (RuntimeError, OSError, EOFError, KeyError, ValueError) as exc:
            raise CompressError(f"CIFAR-10 at '{root / 'cifar-10-batches-py'}' is incomplete or corrupt "
                                f"({type(exc).__name__}: {exc}).") from None
    split = loc / ("train" if train else "val")
    folder = split if split.is_dir() else loc
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise CompressError(f"image folder '{folder}': {exc}. Expected one sub-folder of images per "
                            "class (ImageNet layout: DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg).") from None


def labels_of(dataset: Dataset) -> np.ndarray:
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[np.asarray(dataset.indices)]
    if isinstance(dataset, ArrayDataset):
        return dataset.labels()
    return np.asarray(getattr(dataset, "targets"))


def check_labels(dataset: Dataset, num_classes: int | None, source: str) -> None:
    """Refuse a set with no images, or labels the model has no class for (`num_classes` None:
    identities, any label goes)."""
    if isinstance(dataset, (SegmentationSet, DetectionSet)):
        dataset.check_classes(num_classes, source)
        return
    if isinstance(dataset, PairSet):
        if len(dataset) == 0:
            raise CompressError(f"{source} holds no images.")
        return
    labels = labels_of(dataset)
    if len(labels) == 0:
        raise CompressError(f"{source} holds no images.")
    if num_classes is not None and labels.max() >= num_classes:
        raise CompressError(f"{source} has label {labels.max()} but the model has {num_classes} "
                            "classes; set `num_classes` or use a matching model.")


def transforms(train: bool, input_size: int, mean, std, source_size: int | None = None):
    """Standard torchvision recipes: resize + pad-crop + flip for small source images
    (CIFAR's 32 px, also when upsampled for a pretrained net), random-resized crop + flip for
    ImageNet-style photos; resize + center crop to evaluate. `source_size`: the side of the
    stored images when known (arrays), else the input size decides."""
    small = min(input_size, source_size or input_size) <= 64
    if train:
        geometry = ([v2.Resize(input_size, antialias=True), v2.RandomCrop(input_size, padding=input_size // 8)]
                    if small else [v2.RandomResizedCrop(input_size, antialias=True)])
        geometry.append(v2.RandomHorizontalFlip())
    else:
        geometry = ([v2.Resize(input_size, antialias=True), v2.CenterCrop(input_size)] if small else
                    [v2.Resize(int(round(input_size / 0.875)), antialias=True), v2.CenterCrop(input_size)])
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


def split(spec: str, train: bool, input_size: int, mean, std, num_classes: int | None = 10,
          augment: bool | None = None) -> Dataset:
    """A split of `spec` with the transforms that fit its images: training augmentation on
    the training split unless `augment` says otherwise."""
    ds = build_dataset(spec, train, None, num_classes or 10, input_size)
    augment = train if augment is None else augment
    if isinstance(ds, PairSet):
        ds.configure(augment, input_size, mean, std)
        return ds
    if isinstance(ds, (SegmentationSet, DetectionSet)):
        ds.transform = (dense_transforms if isinstance(ds, SegmentationSet) else box_transforms)(
            augment, input_size, mean, std)
        return ds
    side = ds.x.shape[-1] if isinstance(ds, ArrayDataset) else 32 if isinstance(ds, datasets.CIFAR10) else None
    ds.transform = transforms(augment, input_size, mean, std, side)
    return ds


def check_task(spec: str, task: str) -> None:
    """Refuse data whose targets are not what the model predicts (masks for a classifier)."""
    holds = TARGETS.get(DataSpec.parse(spec).kind, "classify")
    if holds != task and not (task == "embed" and holds == "classify"):  # class labels are identities
        what = {"classify": "class labels", "segment": "masks", "detect": "boxes",
                "restore": "low/high-resolution image pairs"}
        wanted = {"classify": "cifar10:, imagefolder:, npz: or synthetic:", "segment": "voc:DIR or shapes:N",
                  "detect": "coco:DIR or shapeboxes:N",
                  "embed": "identity-labelled images (imagefolder: with a folder per identity, cifar10:, npz:)",
                  "restore": "sr:SPEC:xN (any image set as low/high-resolution pairs)"}[task]
        raise CompressError(f"data {spec} holds {what[holds]}, but the model is a {task} model; give it {wanted} "
                            "data.")


def collate_of(dataset: Dataset):
    """The batching a dataset needs (boxes: a list of targets), None for the default."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "collate", None)


def eval_set(spec: str, input_size: int, mean, std, num_classes: int | None) -> Dataset:
    ds = split(spec, False, input_size, mean, std, num_classes)
    check_labels(ds, num_classes, f"data {spec}")
    return ds


def train_holdout(spec: str, input_size: int, mean, std, num_classes: int | None, holdout: int = 0,
                  seed: int = 0, max_share: float = 1.0) -> tuple[Dataset, Dataset | None, np.ndarray]:
    """The training set minus `holdout` images (at most `max_share` of it) picked with `seed`,
    those images (with eval transforms, for search), and the holdout indices (to record in the
    run folder)."""
    train = split(spec, True, input_size, mean, std, num_classes)
    check_labels(train, num_classes, f"data {spec}")
    holdout = min(holdout, int(max_share * len(train)))
    if holdout <= 0:
        return train, None, np.array([], dtype=np.int64)
    if holdout >= len(train):
        raise CompressError(f"`holdout` {holdout} leaves no training images ({spec} has {len(train)}).")
    plain = split(spec, True, input_size, mean, std, num_classes, augment=False)
    kept, held = holdout_indices(len(train), holdout, seed)
    return Subset(train, kept.tolist()), Subset(plain, held.tolist()), held


def holdout_indices(size: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The indices of a set of `size` images left for training and the `holdout` held out,
    picked with `seed`, each in dataset order."""
    perm = np.random.default_rng(seed).permutation(size)
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


def random_subset(dataset: Dataset, count: int, seed: int = 0) -> Dataset:
    """`count` images picked at random with `seed` (all when `count` is 0 or too large), in
    dataset order. Not the first `count`: evaluation splits are often sorted by class."""
    if not 0 < count < len(dataset):
        return dataset
    return Subset(dataset, np.sort(np.random.default_rng(seed).permutation(len(dataset))[:count]).tolist())


def loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """An in-order loader for evaluation."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_of(dataset),
                      pin_memory=torch.cuda.is_available())


def sample_labelled(spec: str, train: bool, count: int, input_size: int, mean, std,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | list[dict]]:
    """`count` images of a split and their labels, picked at random with `seed`, with
    evaluation transforms: calibration and parity inputs for export."""
    ds = split(spec, train, input_size, mean, std, augment=False)
    if len(ds) == 0:
        raise CompressError(f"data {spec} holds no images.")
    picks = np.sort(np.random.default_rng(seed).permutation(len(ds))[:count])
    pairs = [ds[int(i)] for i in picks]
    images, targets = torch.stack([x for x, _ in pairs]), [y for _, y in pairs]
    if isinstance(targets[0], dict):  # boxes: one target per image
        return images, targets
    return images, torch.stack(targets) if isinstance(targets[0], torch.Tensor) else torch.tensor([int(y) for y in targets])


def sample_images(spec: str, train: bool, count: int, input_size: int, mean, std, seed: int = 0) -> torch.Tensor:
    """The images of `sample_labelled`."""
    return sample_labelled(spec, train, count, input_size, mean, std, seed)[0]
