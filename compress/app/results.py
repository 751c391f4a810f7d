"""The typed results of a recipe run's stages: what each stage returns, what its `stage.json`
keeps (as plain JSON) and what the later stages and the report read back."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

UNPRUNED = "unpruned"  # the tag of the unpruned model's files (the direct path exports and times it too)


def to_json(result: Any) -> dict:
    return dataclasses.asdict(result)


@dataclass
class Transferred:
    model: str  # the transferred checkpoint


@dataclass
class Net:
    path: str
    label: str  # the target's label: macs<=50%, or the search's
    heldout_top1: float | None = None  # the search's score of its config (extracted nets)
    latency: dict | None = None  # a latency target: budget, predicted and measured ms, clock, cuts


@dataclass
class Unpruned:
    macs: int
    params: int
    test: dict  # the task's metric on the evaluation split


@dataclass
class Nets:
    """The prune or extract stage: one net per target, and the model its fine-tune distils from."""
    nets: dict[str, Net]
    teacher: str | None = None
    unpruned: Unpruned | None = None  # the direct path measures the model it pruned

    @classmethod
    def from_json(cls, data: dict) -> Nets:
        return cls({tag: Net(**net) for tag, net in data["nets"].items()}, data["teacher"],
                   Unpruned(**data["unpruned"]) if data.get("unpruned") else None)


@dataclass
class SupernetTrained:
    supernet: str
    summary: dict  # held-out top-1 and MACs of the max and min configs


@dataclass
class LatencyTableBuilt:
    lut: str


@dataclass
class Searched:
    result: str  # search.json
    plot: str  # search.png
    targets: list[dict]  # per target: label, budget, config, MACs, params, held-out top-1
    full: dict  # the full config's MACs and params


@dataclass
class Tuned:
    path: str
    test_before: dict  # the task's metric (and fidelity to the unpruned model) before fine-tuning
    test_after: dict
    kept_best: dict | None = None  # what keep_best returned


@dataclass
class Finetuned:
    nets: dict[str, Tuned]

    @classmethod
    def from_json(cls, data: dict) -> Finetuned:
        return cls({tag: Tuned(**net) for tag, net in data["nets"].items()})


@dataclass
class ExportedFile:
    tag: str  # the target's tag, or UNPRUNED
    variant: str  # onnx, tflite, tflite-int8, onnx-int8, ...: the float file is the format's own
    path: str
    ok: bool
    bytes: int | None = None
    float_bytes: int | None = None
    quantize: str | None = None
    parity: dict | None = None
    keep_float: Any = None  # the ops left in float (static int8)
    error: str | None = None

    @property
    def fmt(self) -> str:
        return self.variant.split("-")[0]


@dataclass
class Exported:
    files: list[ExportedFile]

    @classmethod
    def from_json(cls, data: dict) -> Exported:
        return cls([ExportedFile(**f) for f in data["files"]])


@dataclass
class Timing:
    tag: str
    variant: str
    path: str
    median_ms: float
    budget_ms: float | None
    ok: bool
    backend: str
    threads: int
    measured: dict = field(default_factory=dict)  # everything else the runtime's timing reported


@dataclass
class Timed:
    timings: list[Timing]

    @classmethod
    def from_json(cls, data: dict) -> Timed:
        return cls([Timing(**t) for t in data["timings"]])

    def of(self, tag: str, variant: str) -> Timing | None:
        return next((t for t in self.timings if (t.tag, t.variant) == (tag, variant)), None)


def from_json(kind: type, data: dict):
    """A stage's typed result from what its stage.json holds."""
    reader = getattr(kind, "from_json", None)
    return reader(data) if reader else kind(**data)
