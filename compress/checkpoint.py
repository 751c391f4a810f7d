"""The safe checkpoint: one .pt file that `torch.load(weights_only=True)` reads and that
carries everything needed to rebuild the model (like timm's `pretrained_cfg`)."""
from __future__ import annotations

import datetime
from pathlib import Path

from torch import nn

from compress.models.card import ModelCard, card_of
from compress.errors import CompressError
from compress.files import CHECKPOINT_FORMAT, atomic_save, safe_torch_load
from compress.models import build
from compress.models.sources import is_code
from compress.models.zoo import build_model
from compress.pruning.profile import count
from compress.pruning.prune import prune
from compress.pruning.space import ChannelSpace
from compress.pruning.graph import example_input

FORMAT = CHECKPOINT_FORMAT
VERSION = 1


def save_checkpoint(path: str | Path, model: nn.Module, provenance: dict | None = None) -> dict:
    """Write `model` and its card atomically; returns the record. The card's fields are stored
    flat, beside the state_dict, MACs and params, so the file is plain data."""
    card = card_of(model)
    macs, params = count(model, card.input_size)
    record = {
        "format": FORMAT,
        "version": VERSION,
        **{k: v for k, v in card.to_dict().items() if k != "source"},
        "pruned": card.pruned,
        "macs": macs,
        "params": params,
        "provenance": {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       **(provenance or {})},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_save(record, path)
    return record


def read_checkpoint(path: str | Path) -> dict:
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CompressError(f"'{path}' is a PyTorch file but not a compress checkpoint (no "
                            f"'format': '{FORMAT}' entry). For a plain state_dict use "
                            "pretrained=PATH (--pretrained PATH) with the matching zoo model.")
    if obj.get("version", 0) > VERSION:
        raise CompressError(f"'{path}' is checkpoint format version {obj['version']}; this compress "
                            f"reads up to {VERSION}. Upgrade compress.")
    missing = [k for k in ("arch", "state_dict", "input_size", "num_classes", "mean", "std") if k not in obj]
    if missing:
        raise CompressError(f"'{path}' is a damaged compress checkpoint: missing {', '.join(missing)}.")
    return obj


def load(path: str | Path, model: nn.Module | None = None, weights: bool = True,
         trust_code: bool = False) -> nn.Module:
    """Rebuild a checkpoint's model: build the base architecture (a zoo name or a model
    source), prune it to the stored config, load the weights. A checkpoint of a user's own
    model needs that (unpruned) model passed as `model`, or, when it was built by a factory
    (`file.py:factory`), `trust_code=True` to import and call that factory again: a file
    must not run code just by being loaded. `weights=False` keeps the base architecture's own
    fresh initialisation, cut to the config: the searched architecture, to retrain from scratch."""
    record = read_checkpoint(path)
    arch = record["arch"]
    if "zoo" in arch and model is None:
        if is_code(arch["zoo"]) and not trust_code:
            raise CompressError(f"'{path}' was built by your code, '{arch['zoo']}'. Loading it imports and calls "
                                "that factory: pass trust_code=True (CLI: --trust-code) if you trust the file, or "
                                "build the unpruned model yourself and pass it: compress.load(path, model=...).")
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
    base.card = ModelCard.from_dict({**record, "source": str(path)})
    return base


def is_checkpoint_path(target: str) -> bool:
    return Path(target).suffix in (".pt", ".pth") or Path(target).is_file()


def load_target(target: str, num_classes: int | None = None, width_mult: float = 1.0,
                pretrained: str | None = None, input_size: int | None = None,
                from_scratch: bool = False, trust_code: bool = False, task: str | None = None) -> nn.Module:
    """TARGET as the CLI takes it: a zoo name, a model source (torchvision:NAME, timm:NAME,
    file.py:factory), or the path of a compress checkpoint (`from_scratch`: its architecture
    with a fresh initialisation, not its weights; `trust_code`: see `load`)."""
    if is_checkpoint_path(target):
        for name, value in (("num_classes", num_classes), ("pretrained", pretrained), ("task", task)):
            if value is not None:
                raise CompressError(f"`{name}` applies to zoo models, not to the checkpoint '{target}' "
                                    "(a checkpoint records its own).")
        model = load(target, weights=not from_scratch, trust_code=trust_code)
        if input_size is not None:
            model.card = model.card.replace(input_size=input_size)
        return model
    if from_scratch:
        raise CompressError(f"`from_scratch` retrains a checkpoint's architecture; '{target}' is a zoo "
                            "name, which starts from scratch already unless pretrained weights are given.")
    return build(target, num_classes=num_classes, width_mult=width_mult, pretrained=pretrained,
                 input_size=input_size, task=task)
