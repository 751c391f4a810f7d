"""The model card: what a model needs to be rebuilt, fed and described, travelling with it
(as `model.card`) into every checkpoint and exported file, like timm's `pretrained_cfg`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from compress.errors import CompressError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# what the model's outputs are (compress.training.tasks reads them)
TASKS = ("classify", "segment", "detect", "embed", "restore")


@dataclass(frozen=True)
class ModelCard:
    """`arch` is `{"zoo": name, "kwargs": {...}}` or `{"user": class name}`; `config` is the
    channel config (group -> width) of a pruned model and `space` the settings of the channel
    space it refers to (None for an unpruned model)."""

    arch: dict
    input_size: int
    num_classes: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    config: dict | None = None
    space: dict | None = None
    provenance: dict = field(default_factory=dict)
    source: str = ""
    task: str = "classify"

    def __post_init__(self):
        if int(self.input_size) < 1:
            raise CompressError(f"input size must be a positive number of pixels, got {self.input_size}.")
        if int(self.num_classes) < 1:
            raise CompressError(f"a model needs at least one class, got num_classes={self.num_classes}.")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise CompressError(f"{name} must have 3 values (R, G, B), got {list(values)}.")
            object.__setattr__(self, name, values)
        if self.task not in TASKS:
            raise CompressError(f"task must be one of {', '.join(TASKS)}, got '{self.task}'.")
        if any(v <= 0 for v in self.std):
            raise CompressError(f"std must be positive, got {list(self.std)}.")
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "num_classes", int(self.num_classes))

    @property
    def label_classes(self) -> int | None:
        """The count the data's labels must stay under: the classes, or None for an embedding
        (its labels are identities, its num_classes the embedding's dimension) or a restore
        model (its targets are images, its num_classes their channels)."""
        return None if self.task in ("embed", "restore") else self.num_classes

    @property
    def pruned(self) -> bool:
        return self.config is not None

    def replace(self, **changes) -> "ModelCard":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able data (what a checkpoint and an exported file store)."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None or k in ("config", "space")})


def card_of(model: nn.Module) -> ModelCard:
    """The card a model carries; a model without one gets a clear error."""
    card = getattr(model, "card", None)
    if not isinstance(card, ModelCard):
        raise CompressError(f"this {type(model).__name__} carries no model card: build it with compress.build(), "
                            "load it with compress.load(), or describe your own model with "
                            "compress.describe(model, input_size=..., num_classes=...).")
    return card


def attach(model: nn.Module, card: ModelCard) -> nn.Module:
    """Give `model` its card (returns the model, for chaining)."""
    model.card = card
    return model


def describe(model: nn.Module, input_size: int, num_classes: int | None = None, mean=IMAGENET_MEAN,
             std=IMAGENET_STD, task: str | None = None) -> nn.Module:
    """Attach a card to a user's own CNN: its input size, class count (read off the last
    Linear layer, or a dense model's output channels, when not given), the mean/std its inputs
    are normalised with, and its task (classify, segment, detect, embed or restore; read off its output on one
    image when not given)."""
    task = task or infer_task(model, input_size)
    if num_classes is None:
        num_classes = classes_of(model, input_size, task)
    return attach(model, ModelCard(arch={"user": type(model).__name__}, input_size=input_size,
                                   num_classes=num_classes, mean=tuple(mean), std=tuple(std), task=task))


def classes_of(model: nn.Module, input_size: int, task: str, name: str | None = None) -> int:
    """A model's class count: a dense model's output channels or an embedding's dimension, else
    its last Linear layer's outputs (`name`: what the error calls the model)."""
    if task in ("segment", "embed", "restore"):
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, input_size, input_size))
        return int((out["out"] if isinstance(out, dict) else out).shape[1])
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise CompressError(f"{name or type(model).__name__} has no nn.Linear head to read the class count "
                            "from; pass num_classes= (--num-classes).")
    return heads[-1].out_features


def infer_task(model: nn.Module, input_size: int) -> str:
    """classify when a model maps an image batch to (N, classes), segment when to per-pixel
    logits (a 4-D tensor, or a dict with "out"); what `describe` records when not told."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:
        raise CompressError(f"{type(model).__name__} does not run on a {input_size}x{input_size} image "
                            f"({type(exc).__name__}: {str(exc)[:200]}); check the input size.") from None
    finally:
        model.train(was_training)
    if isinstance(out, dict) and isinstance(out.get("out"), torch.Tensor) and out["out"].dim() == 4:
        return "segment"
    if isinstance(out, torch.Tensor):
        return "segment" if out.dim() == 4 else "classify"
    return "detect"
