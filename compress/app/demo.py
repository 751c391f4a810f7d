"""`python -m compress.app.demo`: the recipe overrides `make demo` runs `recipes/quickstart.yaml`
with, so the demo finds its data and pretrained weights on this machine or downloads them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from compress.errors import CompressError

SHARED = Path("../shared")  # beside the checkout, where a workplace keeps data and weights


def demo_cifar10(download_root: str | Path = "runs/data") -> str:
    """The CIFAR-10 data spec: $COMPRESS_DATA, else the arrays beside the checkout
    (../shared/data/cifar10), else torchvision's download (when online)."""
    if os.environ.get("COMPRESS_DATA"):
        value = os.environ["COMPRESS_DATA"]
        return value if ":" in value else f"cifar10:{value}"
    shared = SHARED / "data" / "cifar10"
    if (shared / "train.npz").is_file():
        return f"cifar10:{shared}"
    from torchvision import datasets
    root = Path(download_root)
    try:
        datasets.CIFAR10(str(root), train=True, download=True)
        datasets.CIFAR10(str(root), train=False, download=True)
    except Exception as exc:
        raise CompressError(f"no CIFAR-10 for the demo: COMPRESS_DATA is not set, ../shared/data/cifar10 has no "
                            f"train.npz, and the download failed ({type(exc).__name__}: {str(exc)[:200]}). Set "
                            "COMPRESS_DATA=/path/to/cifar-10-batches-py (or a folder with train.npz/test.npz).") from None
    return f"cifar10:{root}"


def demo_pretrained() -> str:
    """The ImageNet MobileNetV2 weights: $COMPRESS_PRETRAINED, else the torchvision-format file
    beside the checkout, else torchvision's own (downloaded on first use)."""
    if os.environ.get("COMPRESS_PRETRAINED"):
        return os.environ["COMPRESS_PRETRAINED"]
    shared = SHARED / "pretrained" / "mobilenet_v2_imagenet.pth"
    return str(shared) if shared.is_file() else "torchvision"


if __name__ == "__main__":
    try:
        print(f"data.spec={demo_cifar10()} model.pretrained={demo_pretrained()}")
    except CompressError as exc:
        print(f"make demo: {exc}", file=sys.stderr)
        sys.exit(2)
