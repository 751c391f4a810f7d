"""Model sources: every way a model is named, resolved in one place into a registry entry.

- `torchvision:NAME`: any torchvision builder (classification, segmentation, detection);
- `timm:NAME`: any timm model (`pip install timm`);
- `path/to/file.py:factory` or `package.module:factory`: a function of your own that returns
  the model (called with `num_classes=` when a class count is given).

Each entry records the builder's defaults (input size, classes, mean/std, the weights enum),
so a checkpoint's card names the source and `compress.load` rebuilds it.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

from torch import nn
from torchvision import models as tvm

from compress.models.card import IMAGENET_MEAN, IMAGENET_STD
from compress.errors import CompressError
from compress.models.detection import RawDetector, raw_form
from compress.models.entry import ZooEntry

PREFIXES = ("torchvision:", "timm:")


def is_source(name: str) -> bool:
    """A source string (with a prefix or a factory), as opposed to a zoo name or a file path."""
    return name.startswith(PREFIXES) or is_code(name)


def is_code(name: str) -> bool:
    """`file.py:factory` or `package.module:factory`: a source that runs the user's own code."""
    if name.startswith(PREFIXES) or ":" not in name:
        return False
    module, _, factory = name.rpartition(":")
    return bool(module) and factory.isidentifier() and (module.endswith(".py") or all(
        part.isidentifier() for part in module.split(".")))


@functools.lru_cache(maxsize=None)
def source_entry(name: str):
    """The registry entry (`compress.models.zoo.ZooEntry`) of a source string."""
    kind, _, rest = name.partition(":")
    if kind == "torchvision":
        return ZooEntry(name, *_torchvision(rest))
    if kind == "timm":
        return ZooEntry(name, *_timm(rest))
    if is_code(name):
        return ZooEntry(name, *_code(name))
    raise CompressError(f"'{name}' is not a model source: use torchvision:NAME, timm:NAME, path/to/file.py:factory "
                        "or package.module:factory.")


def _fixed_width(build: Callable[..., nn.Module], name: str) -> Callable[..., nn.Module]:
    def with_width(num_classes: int | None, width_mult: float = 1.0) -> nn.Module:
        if width_mult != 1.0:
            raise CompressError(f"`width_mult` applies to the zoo's MobileNets; '{name}' is built at its own width "
                                "(prune it to make it narrower).")
        return build(num_classes)
    return with_width


def _torchvision(arch: str) -> tuple:
    if arch not in tvm.list_models():
        close = difflib.get_close_matches(arch, tvm.list_models(), n=1)
        raise CompressError(f"torchvision has no model '{arch}'" + (f"; did you mean 'torchvision:{close[0]}'?"
                            if close else "; `torchvision.models.list_models()` lists them."))
    builder = tvm.get_model_builder(arch)
    params = inspect.signature(builder).parameters
    weights = _default_weights(arch)
    num_classes, input_size, mean, std = 1000, 224, IMAGENET_MEAN, IMAGENET_STD
    if weights is not None:
        num_classes = len(weights.meta.get("categories") or []) or num_classes
        transform = weights.transforms()
        sizes = getattr(transform, "crop_size", None) or getattr(transform, "resize_size", None)
        input_size = int(sizes[0]) if sizes else _size_in_name(arch)
        mean, std = tuple(getattr(transform, "mean", mean)), tuple(getattr(transform, "std", std))

    def build(classes: int | None) -> nn.Module:
        kwargs = {"weights": None, "num_classes": classes or num_classes}
        if "weights_backbone" in params:  # its default downloads ImageNet weights
            kwargs["weights_backbone"] = None
        model = builder(**kwargs)
        # a one-stage detector up to its raw head outputs: resizing, normalising and NMS stay outside
        return raw_form(model)

    module = next((t for t in ("segmentation", "detection", "video", "optical_flow", "quantization")
                   if arch in tvm.list_models(module=getattr(tvm, t))), "classification")
    task = {"segmentation": "segment", "detection": "detect"}.get(module, "classify")
    if task == "detect":  # the detector normalises inside; its raw network takes what its transform gives
        probe = build(None)
        if isinstance(probe, RawDetector):
            mean, std = probe.image_mean, probe.image_std
    return (_fixed_width(build, f"torchvision:{arch}"), input_size, num_classes,
            None if weights is None else str(weights), False, f"torchvision {arch} ({module})", mean, std, task)


def _default_weights(arch: str):
    try:
        return tvm.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def _size_in_name(arch: str) -> int:
    """ssdlite320_... -> 320, ssd300_... -> 300; 224 when the name carries no size."""
    digits = "".join(c if c.isdigit() else " " for c in arch.split("_")[0]).split()
    return int(digits[-1]) if digits and int(digits[-1]) >= 64 else 224


def _timm(arch: str) -> tuple:
    try:
        import timm
    except ImportError:
        raise CompressError(f"'timm:{arch}' needs timm: pip install timm (or pip install 'compress[timm]').") from None
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        raise CompressError(f"timm has no model '{arch}'" + (f"; did you mean 'timm:{close[0]}'?" if close else
                                                              "; `timm.list_models()` lists them."))
    cfg = timm.models.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    num_classes = cfg.get("num_classes") or 1000

    def build(classes: int | None) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=classes or num_classes)

    return (_fixed_width(build, f"timm:{arch}"), int(cfg.get("input_size", (3, 224, 224))[-1]), num_classes, "timm",
            False, f"timm {arch}", tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))


def _code(name: str) -> tuple:
    module_name, _, factory_name = name.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise CompressError(f"model source '{name}': the file '{path}' does not exist (a relative path is read "
                                "from the current directory).")
        spec = importlib.util.spec_from_file_location(f"compress_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # so dataclasses and pickling inside it find their module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise CompressError(f"model source '{name}': importing '{path}' failed: {type(exc).__name__}: {exc}") \
                from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CompressError(f"model source '{name}': cannot import '{module_name}' ({exc}); is it installed or on "
                                "PYTHONPATH?") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        known = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(factory_name, known, n=1)
        raise CompressError(f"model source '{name}': '{module_name}' has no function '{factory_name}'"
                            + (f"; did you mean '{close[0]}'?" if close else "") + ".")

    def build(classes: int | None) -> nn.Module:
        try:
            model = factory(num_classes=classes) if classes is not None else factory()
        except TypeError as exc:
            raise CompressError(f"model source '{name}': calling {factory_name}"
                                f"({'num_classes=' + str(classes) if classes is not None else ''}) failed: {exc}. "
                                "The factory takes no arguments, or `num_classes`.") from None
        if not isinstance(model, nn.Module):
            raise CompressError(f"model source '{name}': {factory_name}() returned a {type(model).__name__}, not an "
                                "nn.Module.")
        return raw_form(model)

    return (_fixed_width(build, name), 224, None, None, False, f"{factory_name} from {module_name}", IMAGENET_MEAN,
            IMAGENET_STD, None)
