"""The safe checkpoint: one .pt file that `torch.load(weights_only=True)` reads and that
carries everything needed to rebuild the model (like timm's `pretrained_cfg`)."""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from compress.errors import CompressError

FORMAT = "compress.checkpoint"
VERSION = 1


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over it: a crash
    leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint_dict(path: str | Path):
    """torch.load with weights_only=True, turning every failure into a message naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"checkpoint '{path}' does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CompressError(f"'{path}' holds pickled Python objects that a weights-only load refuses "
                            f"({str(exc).splitlines()[0][:200]}); compress never unpickles code. Save "
                            "the model's state_dict() instead.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CompressError(f"'{path}' is not a readable PyTorch file: it is truncated, corrupt "
                            f"or of another format ({type(exc).__name__}: {str(exc)[:200]}).") from None


def model_cfg(model: nn.Module) -> dict:
    """What `build`/`load` recorded about a model: arch, config, input size, mean/std, classes."""
    cfg = getattr(model, "compress_cfg", None)
    if cfg is None:
        raise CompressError("this model carries no compress_cfg; build it with compress.build() or "
                            "load it with compress.load(), or pass the fields to save_checkpoint().")
    return cfg


def save_checkpoint(path: str | Path, model: nn.Module, provenance: dict | None = None,
                    **overrides) -> dict:
    """Write `model` and its compress_cfg (fields overridable) atomically; returns the record."""
    from compress.profile import count
    cfg = {**model_cfg(model), **overrides}
    macs, params = count(model, cfg["input_size"])
    record = {
        "format": FORMAT,
        "version": VERSION,
        "arch": cfg["arch"],
        "pruned": cfg.get("config") is not None,
        "config": cfg.get("config"),
        "space": cfg.get("space"),
        "input_size": int(cfg["input_size"]),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "num_classes": int(cfg["num_classes"]),
        "macs": macs,
        "params": params,
        "provenance": {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       **(provenance or {})},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_save(record, path)
    return record


def read_checkpoint(path: str | Path) -> dict:
    obj = read_checkpoint_dict(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CompressError(f"'{path}' is a PyTorch file but not a compress checkpoint (no "
                            f"'format': '{FORMAT}' entry). For a plain state_dict use "
                            "--pretrained PATH with the matching zoo model.")
    if obj.get("version", 0) > VERSION:
        raise CompressError(f"'{path}' is checkpoint format version {obj['version']}; this compress "
                            f"reads up to {VERSION}. Upgrade compress.")
    missing = [k for k in ("arch", "state_dict", "input_size", "num_classes", "mean", "std") if k not in obj]
    if missing:
        raise CompressError(f"'{path}' is a damaged compress checkpoint: missing {', '.join(missing)}.")
    return obj


def load(path: str | Path, model: nn.Module | None = None, weights: bool = True) -> nn.Module:
    """Rebuild a checkpoint's model: build the base architecture, prune it to the stored
    config, load the weights. A checkpoint of a user's own model needs that (unpruned)
    model passed as `model`. `weights=False` keeps the base architecture's own fresh
    initialisation, cut to the config: the searched architecture, to retrain from scratch."""
    from compress.models.zoo import build_model, example_input
    from compress.prune import prune
    from compress.space import ChannelSpace

    record = read_checkpoint(path)
    arch = record["arch"]
    if "zoo" in arch:
        base = build_model(arch["zoo"], **arch.get("kwargs", {}))
    elif model is None:
        raise CompressError(f"'{path}' holds a user-defined model ({arch.get('user', '?')}); pass "
                            "the unpruned model: compress.load(path, model=MyNet()).")
    else:
        base = model
    base.eval()
    if record.get("config") is not None:
        space = ChannelSpace.from_model(base, example_input(record["input_size"]), **(record.get("space") or {}))
        try:
            base = prune(base, record["config"], space, importance="first")
        except CompressError as exc:
            raise CompressError(f"'{path}': its channel config does not fit its architecture: {exc}") from None
    if weights:
        try:
            base.load_state_dict(record["state_dict"])
        except RuntimeError as exc:
            raise CompressError(f"'{path}': weights do not fit the rebuilt model: {str(exc)[:500]}") from None
    base.compress_cfg = {k: record.get(k) for k in (
        "arch", "config", "space", "input_size", "mean", "std", "num_classes", "provenance")}
    base.compress_cfg["source"] = str(path)
    return base
