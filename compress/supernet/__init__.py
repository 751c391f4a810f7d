"""Weight-sharing supernets over a model's channel space, and their checkpoint file.

A supernet checkpoint (`supernet.pt`, read with `torch.load(weights_only=True)`) records the
method, its structural options, the space settings, the base model's card, the
held-out split the search scores on, and the weights.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from compress.models.card import ModelCard, card_of
from compress.errors import CompressError
from compress.files import atomic_save, safe_torch_load
from compress.models.zoo import build_model
from compress.pruning.space import ChannelSpace
from compress.pruning.graph import example_input
from compress.supernet.dynamic import Supernet, recalibrate_bn
from compress.supernet.pruningnet import PruningNet
from compress.supernet.slimmable import Slimmable

FORMAT = "compress.supernet"
METHODS = ("slimmable", "pruningnet")

__all__ = ["METHODS", "PruningNet", "Slimmable", "Supernet", "build_supernet", "load_supernet",
           "recalibrate_bn", "save_supernet"]


def build_supernet(model: nn.Module, method: str, divisor: int = 8, min_width: float = 0.25,
                   hidden: int = 32, affine_bn: bool = False) -> Supernet:
    """Wrap `model` (carrying a card) as a supernet over its channel space."""
    if method not in METHODS:
        raise CompressError(f"unknown supernet method '{method}'; choose one of {', '.join(METHODS)}.")
    card = card_of(model)
    if card.pruned:
        raise CompressError(f"'{card.source}' is already pruned; build the supernet from the unpruned model.")
    if not 0 < min_width <= 1:
        raise CompressError(f"`min_width` must be in (0, 1], got {min_width}.")
    space = ChannelSpace.from_model(model, example_input(card.input_size, model), divisor=divisor,
                                    min_ratio=min_width)
    if method == "slimmable":
        return Slimmable(model, space)
    return PruningNet(model, space, hidden=hidden, affine_bn=affine_bn)


def options_of(supernet: Supernet) -> dict:
    if isinstance(supernet, PruningNet):
        return {"hidden": supernet.hidden, "affine_bn": supernet.affine_bn}
    return {}


def save_supernet(path: str | Path, supernet: Supernet, holdout: dict, provenance: dict | None = None) -> None:
    atomic_save({
        "format": FORMAT, "version": 1, "method": supernet.method, "options": options_of(supernet),
        "space": supernet.space.settings(), "holdout": holdout, "provenance": provenance or {},
        "base": {k: v for k, v in supernet.card.to_dict().items() if k not in ("config", "space", "provenance")},
        "state_dict": {k: v.detach().cpu() for k, v in supernet.state_dict().items()},
    }, path)


def load_supernet(path: str | Path, model: nn.Module | None = None) -> tuple[Supernet, dict]:
    """(supernet, its record without the weights). A user-defined model needs `model` (unpruned)."""
    path = Path(path)
    if path.is_dir():
        path = path / "supernet.pt"
    record = safe_torch_load(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CompressError(f"'{path}' is not a supernet checkpoint (train one with `chansearch supernet`).")
    base = record["base"]
    if "zoo" in base["arch"]:
        model = build_model(base["arch"]["zoo"], **base["arch"].get("kwargs", {}))
    elif model is None:
        raise CompressError(f"'{path}' is a supernet of a user-defined model; pass it: load_supernet(path, model=MyNet()).")
    model.card = ModelCard.from_dict(base)
    space = record["space"]
    supernet = build_supernet(model, record["method"], divisor=space["divisor"], min_width=space["min_ratio"],
                              **record["options"])
    try:
        supernet.load_state_dict(record.pop("state_dict"))
    except RuntimeError as exc:
        raise CompressError(f"'{path}': weights do not fit the rebuilt supernet: {str(exc)[:400]}") from None
    supernet.card = supernet.card.replace(source=str(path))
    return supernet.eval(), record
