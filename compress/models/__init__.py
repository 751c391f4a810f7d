"""Model zoo and the one entry point that turns a TARGET (zoo name or checkpoint) into a model."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from compress.errors import CompressError
from compress.models.zoo import ZOO, ZooEntry, build_model, zoo_entry

__all__ = ["ZOO", "ZooEntry", "build", "build_model", "load_target", "zoo_entry"]


def build(name: str, num_classes: int | None = None, width_mult: float = 1.0,
          pretrained: str | None = None, input_size: int | None = None) -> nn.Module:
    """A zoo model carrying its `compress_cfg` (arch, input size, mean/std, classes)."""
    entry = zoo_entry(name)
    model = build_model(name, num_classes=num_classes, width_mult=width_mult, pretrained=pretrained)
    num_classes = entry.num_classes if num_classes is None else num_classes
    model.compress_cfg = {
        "arch": {"zoo": name, "kwargs": {"num_classes": num_classes, "width_mult": width_mult}},
        "config": None, "space": None,
        "input_size": input_size or entry.input_size,
        "mean": list(entry.mean), "std": list(entry.std), "num_classes": num_classes,
        "source": f"{name}" + (f" ({pretrained} weights)" if pretrained else ""),
    }
    return model


def is_checkpoint_path(target: str) -> bool:
    return Path(target).suffix in (".pt", ".pth") or Path(target).is_file()


def load_target(target: str, num_classes: int | None = None, width_mult: float = 1.0,
                pretrained: str | None = None, input_size: int | None = None,
                from_scratch: bool = False) -> nn.Module:
    """TARGET as the CLI takes it: a zoo name, or the path of a compress checkpoint
    (`from_scratch`: its architecture with a fresh initialisation, not its weights)."""
    if is_checkpoint_path(target):
        from compress.checkpoint import load
        for flag, value in (("--num-classes", num_classes), ("--pretrained", pretrained)):
            if value is not None:
                raise CompressError(f"{flag} applies to zoo models, not to the checkpoint '{target}' "
                                    "(a checkpoint records its own).")
        model = load(target, weights=not from_scratch)
        if input_size is not None:
            model.compress_cfg["input_size"] = input_size
        return model
    if from_scratch:
        raise CompressError(f"--from-scratch retrains a checkpoint's architecture; '{target}' is a zoo "
                            "name, which starts from scratch already unless --pretrained is given.")
    return build(target, num_classes=num_classes, width_mult=width_mult, pretrained=pretrained,
                 input_size=input_size)
