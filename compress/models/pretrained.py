"""Pretrained weights: torchvision's weights enums, or a local state_dict file."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from compress.errors import CompressError
from compress.files import CHECKPOINT_FORMAT, safe_torch_load
from compress.logs import notes


def torchvision_state_dict(weights_name: str) -> dict:
    weights = tvm.get_weight(weights_name)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # offline: URLError, socket errors, hash failures
        raise CompressError(
            f"could not get torchvision weights {weights_name} from {weights.url} ({exc}). "
            f"Without internet, download that file elsewhere and put it at {cache}, "
            "or use a local .pth state_dict (pretrained=PATH).") from None


def read_state_dict(path: str | Path) -> dict:
    """A state_dict from a .pth file: plain, wrapped ({'state_dict': ...}) or our checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"pretrained weights file '{path}' does not exist.")
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("pruned"):
            raise CompressError(f"'{path}' is a pruned compress checkpoint; load it with "
                                "compress.load() (the CLI: pass it as the TARGET) instead of as pretrained weights.")
        obj = obj["state_dict"]
    for key in ("state_dict", "model", "model_state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CompressError(f"'{path}' does not hold a state_dict (a dict of tensors).")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def timm_state_dict(arch: str) -> dict:
    import timm
    try:
        return timm.create_model(arch, pretrained=True).state_dict()
    except Exception as exc:  # offline: the Hugging Face hub is out of reach
        raise CompressError(f"could not get timm's pretrained weights for {arch} ({type(exc).__name__}: {exc}). "
                            "Without internet, save them elsewhere (timm.create_model(name, pretrained=True)"
                            ".state_dict()) and pass the file as pretrained=PATH.") from None


def _backbone_transfer(own: dict, state: dict, source: str) -> bool:
    """Whether `state` is a backbone for `own`: the tensors they share have the same shapes,
    and what is left on either side lies under top-level names the other side lacks (the
    weights' classifier; the model's new head). Says so in a note when it is."""
    shared = [k for k in state if k in own]
    unused, new = [k for k in state if k not in own], [k for k in own if k not in state]
    if not shared or not new or any(state[k].shape != own[k].shape for k in shared) or (
            _tops(unused) & _tops(shared)) or (_tops(new) & _tops(shared)):
        return False
    notes.info(f"{source}: backbone loaded ({len(shared)} tensors); new {', '.join(sorted(_tops(new)))} initialized"
               + (f", the weights' {', '.join(sorted(_tops(unused)))} left out" if unused else "") + ".")
    return True


def _detector_backbone(own: dict, state: dict) -> dict | None:
    """A classifier's weights as a torchvision detector's `backbone.body` (a MobileNet's
    `features`, a ResNet's stem and stages), as torchvision's `weights_backbone` loads them:
    the mapped tensors when they fill the whole body, else None."""
    body = [k for k in own if k.startswith("backbone.body.")]
    if not body:
        return None
    for mapped in ({"backbone.body." + k.partition(".")[2]: v for k, v in state.items() if k.startswith("features.")},
                   {"backbone.body." + k: v for k, v in state.items()}):
        fits = {k: v for k, v in mapped.items() if k in own and own[k].shape == v.shape}
        if len(fits) == len(body):
            return fits
    return None


def _tops(keys) -> set[str]:
    return {k.split(".")[0] for k in keys}


def load_pretrained(model: nn.Module, entry, pretrained: str, width_mult: float) -> None:
    hub = "timm" if entry.weights == "timm" else "torchvision"
    if pretrained in ("torchvision", "timm") and pretrained != hub:
        raise CompressError(f"'{entry.name}' takes pretrained={hub} (its own library's weights) or a local .pth file, "
                            f"not pretrained={pretrained}.")
    if pretrained == "timm":
        load_state_dict_checked(model, timm_state_dict(entry.name.removeprefix("timm:")), f"timm's {entry.name}")
        return
    if pretrained == "torchvision":
        if entry.weights is None:
            raise CompressError(f"torchvision has no pretrained weights for '{entry.name}'; "
                                "use a local state_dict (pretrained=PATH) instead.")
        if width_mult != 1.0:
            raise CompressError(f"torchvision's {entry.weights} are for width_mult=1.0, "
                                f"not {width_mult}; build 1.0x and prune it instead.")
        state = torchvision_state_dict(entry.weights)
        source = entry.weights
    else:
        state = read_state_dict(pretrained)
        source = pretrained
    load_state_dict_checked(model, state, source)


def load_state_dict_checked(model: nn.Module, state: dict, source: str) -> None:
    """Load strictly, except a classifier head whose class count differs (re-initialized), or
    a backbone under a new task's head (a classifier's weights for a segmenter)."""
    own = model.state_dict()
    body = _detector_backbone(own, state)
    if body is not None:
        notes.info(f"{source}: backbone loaded into the detector's backbone.body ({len(body)} tensors); its "
                   f"feature pyramid and head initialized.")
        model.load_state_dict(body, strict=False)
        return
    if _backbone_transfer(own, state, source):
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        return
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head = linear[-1] if linear else None  # a detector or segmenter has none
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    head_keys = [k for k in mismatched if head and k.startswith(head + ".")]
    if head_keys and len(head_keys) == len(mismatched):
        # what a transfer asks for: a note, not a warning
        notes.info(f"{source}: new classifier head '{head}' for {own[head + '.weight'].shape[0]} classes (the "
                   f"weights have {state[head + '.weight'].shape[0]}); the backbone is kept.")
        state = {k: v for k, v in state.items() if k not in head_keys}
        mismatched = []
        missing_ok = set(head_keys)
    else:
        missing_ok = set()
    missing = [k for k in own if k not in state and k not in missing_ok]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append("mismatched shapes: " + show(
                [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]))
        raise CompressError(f"the weights in {source} do not fit the model: " + "; ".join(parts)
                            + ". Check the model name, `width_mult` and `num_classes`.")
    model.load_state_dict(state, strict=not missing_ok)
