"""The YAML recipe: a pydantic schema, error messages that point at the file and line, and
`key.path=value` overrides from the command line."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from compress.errors import CompressError
from compress.units import parse_count


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    name: str  # zoo name or checkpoint path
    pretrained: str | None = None  # torchvision | PATH
    num_classes: int | None = None
    width_mult: float = 1.0
    input_size: int | None = None


class DataSection(_Section):
    spec: str
    batch_size: int = 128
    workers: int = 2
    holdout: int = 5000  # training images held out for the search


def _count(value, what: str):
    if value is None:
        return None
    text = str(value).strip()
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGkmg]?|\d+(\.\d+)?\s*%", text):
        raise ValueError(f"'{value}' is not a {what} like 150M, 1.2G, 300000 or 50%")
    parse_count(text.replace(" ", ""), what, full=1)
    return text.replace(" ", "")


class Target(_Section):
    macs: str | None = None
    params: str | None = None
    latency_ms: float | None = None

    @field_validator("macs", mode="before")
    @classmethod
    def _macs(cls, v):
        return _count(v, "MAC count")

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, v):
        return _count(v, "parameter count")

    @model_validator(mode="after")
    def _some(self):
        if self.macs is None and self.params is None and self.latency_ms is None:
            raise ValueError("a target needs at least one of macs, params, latency_ms")
        return self

    def tag(self) -> str:
        parts = [f"macs{self.macs}" if self.macs else "", f"params{self.params}" if self.params else "",
                 f"lat{self.latency_ms:g}ms" if self.latency_ms else ""]
        return "_".join(p for p in parts if p).replace("%", "pct").replace(".", "p")


class Training(_Section):
    epochs: int = 10
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    steps_per_epoch: int = 0  # 0 = whole training set
    val_images: int = 1000
    channels_last: bool = True
    amp: Literal["none", "bf16", "fp16"] = "none"


class SupernetSection(Training):
    method: Literal["slimmable", "pruningnet", "none"] = "slimmable"
    min_width: float = 0.25
    divisor: int = 8
    num_random: int = 2
    uniform: bool = False
    distill: bool = True
    reorder: bool = True
    hidden: int = 32


class LutSection(_Section):
    backend: Literal["tflite", "onnxruntime"] = "tflite"
    threads: int = 1
    grid: int = 4
    anchors: int = 6


class SearchSection(_Section):
    method: Literal["greedy", "evolution", "random"] = "greedy"
    targets: list[Target] = []
    recal_images: int = 2000
    eval_images: int = 5000
    greedy_step: float = 0.1
    population: int = 50
    parents: int = 10
    mutations: int = 25
    crossovers: int = 25
    iterations: int = 20
    mutation_prob: float = 0.1
    samples: int = 1000
    lut: LutSection | None = None  # needed for latency_ms targets


class PruneSection(_Section):
    importance: Literal["l1", "l2", "bn", "first"] = "l1"
    strategy: Literal["uniform", "global"] = "global"
    divisor: int = 8
    targets: list[Target] = []


class FinetuneSection(Training):
    epochs: int = 5
    lr: float = 0.01
    from_scratch: bool = False  # retrain the architecture from a fresh initialisation (MetaPruning, AutoSlim)
    distill: bool = True  # from the unpruned model (or the supernet's full config)
    kd_weight: float = 0.5
    kd_temperature: float = 4.0

    @model_validator(mode="after")
    def _scratch(self):
        if self.from_scratch and self.epochs == 0:
            raise ValueError("from_scratch needs epochs > 0: a freshly initialised net must be trained")
        return self


class ExportSection(_Section):
    formats: list[Literal["onnx", "tflite"]] = ["onnx", "tflite"]
    int8: bool = False
    calib_images: int = 200
    parity_images: int = 100
    tolerance: float = 1e-4
    min_agreement: float | None = None


class LatencySection(_Section):
    backend: Literal["auto", "onnxruntime", "tflite"] = "auto"
    threads: int = 1
    runs: int = 50
    warmup: int = 10
    device: str = "local"
    budget_ms: float | None = None


class Recipe(_Section):
    name: str
    seed: int = 0
    out: str = "runs"
    model: ModelSection
    data: DataSection
    supernet: SupernetSection = SupernetSection()
    search: SearchSection = SearchSection()
    prune: PruneSection = PruneSection()
    finetune: FinetuneSection = FinetuneSection()
    export: ExportSection = ExportSection()
    latency: LatencySection = LatencySection()

    @model_validator(mode="after")
    def _paths(self):
        if self.supernet.method == "none":
            if not self.prune.targets:
                raise ValueError("with supernet.method: none (the direct path), give prune.targets")
            if any(t.params or t.latency_ms or not t.macs for t in self.prune.targets):
                raise ValueError("prune.targets take MAC targets only (macs: 150M or 50%)")
        elif not self.search.targets:
            raise ValueError("give search.targets (e.g. - macs: 50%), or set supernet.method: none and prune.targets")
        if any(t.latency_ms for t in self.search.targets) and self.search.lut is None:
            raise ValueError("latency_ms targets need search.lut (backend, threads) to predict latency")
        return self

    def targets(self) -> list[Target]:
        return self.prune.targets if self.supernet.method == "none" else self.search.targets

    def run_dir(self) -> Path:
        return Path(self.out) / self.name


# ---- loading --------------------------------------------------------------------------------
def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is a CompressError naming the
    file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"recipe '{path}' does not exist.")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise CompressError(f"{where}: malformed YAML: {getattr(exc, 'problem', exc)}.") from None
    if not isinstance(data, dict):
        raise CompressError(f"{path}: a recipe is a YAML mapping (model:, data:, ...), not {type(data).__name__}.")
    for item in overrides:
        _apply_override(data, item)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise CompressError(_explain(exc, path, node, overrides)) from None


def _apply_override(data: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise CompressError(f"override '{item}' must look like key.path=value (e.g. finetune.epochs=2).")
    parts = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[(\d+)\]", key) if p]
    target = data
    for i, part in enumerate(parts[:-1]):
        nxt = {} if not isinstance(parts[i + 1], int) else []
        if isinstance(part, int):
            if not isinstance(target, list) or part >= len(target):
                raise CompressError(f"override '{item}': {'.'.join(map(str, parts[:i + 1]))} has no item {part}.")
            target = target[part]
        else:
            target = target.setdefault(part, nxt) if isinstance(target, dict) else None
        if target is None:
            raise CompressError(f"override '{item}': {'.'.join(map(str, parts[:i + 1]))} is not a section.")
    last = parts[-1]
    parsed = yaml.safe_load(value) if value else None
    if isinstance(last, int):
        if not isinstance(target, list) or last >= len(target):
            raise CompressError(f"override '{item}': no item {last} to set.")
        target[last] = parsed
    else:
        target[last] = parsed


def _line(node, loc: tuple) -> int | None:
    """The 1-based line of the deepest YAML node along `loc` (the parent's, for a missing key)."""
    line = None
    for part in loc:
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
        if node is None:
            return line
    return node.start_mark.line + 1


def _fields_at(loc: tuple) -> list[str]:
    model = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            inner2 = [getattr(a, "__args__", ()) for a in inner]
            model = next((b for group in inner2 for b in group if isinstance(b, type) and issubclass(b, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _explain(exc: ValidationError, path: Path, node, overrides) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"])
        key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc)) or "(top)"
        overridden = any(o.split("=", 1)[0].replace("[", ".").replace("]", "") == key.replace("[", ".").replace("]", "")
                         for o in overrides)
        line = None if overridden else _line(node, loc)
        where = f"{path}:{line}" if line else (f"{path} (command-line override)" if overridden else str(path))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc), n=1)
            msg = f"unknown key '{loc[-1]}'" + (f" (did you mean '{close[0]}'?)" if close else "")
        elif err["type"] == "missing":
            msg = "is required"
        elif "input" in err and err["type"] not in ("value_error",):
            msg = f"{err['input']!r}: {msg}"
        lines.append(f"{where} {key}: {msg}")
    more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
    return "; ".join(lines[:5]) + more + ". `chansearch run --print-config RECIPE` shows every key with its default."


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
