"""The YAML recipe: a pydantic schema, error messages that point at the file and line, and
`key.path=value` overrides from the command line."""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from compress.checkpoint import is_checkpoint_path
from compress.errors import CompressError
from compress.pruning.importance import names as importance_names
from compress.settings import (DataSettings, ExportSettings, ExtractSettings, FinetuneSettings, LatencySettings,
                               LutSettings, ModelSettings, PruneSettings, SearchSettings, Settings, SupernetSettings,
                               Target, TransferSettings)


class SearchSection(SearchSettings):
    lut: LutSettings | None = None  # how to build the latency model latency targets need


class PruneSection(PruneSettings):
    lut: LutSettings = LutSettings()  # the clock latency targets are measured on


class Recipe(Settings):
    """A whole run: one section per stage, each the settings model that stage takes."""

    name: str = Field(description="the run's name: its folder is OUT/NAME")
    seed: int = Field(0, description="every stage's seed unless its section sets its own")
    out: str = Field("runs", description="where run folders go")
    model: ModelSettings
    data: DataSettings
    transfer: TransferSettings | None = None  # train the model on the data first (a pretrained one)
    supernet: SupernetSettings = SupernetSettings()
    search: SearchSection = SearchSection()
    extract: ExtractSettings = ExtractSettings()
    prune: PruneSection = PruneSection()
    finetune: FinetuneSettings = FinetuneSettings()
    export: ExportSettings = ExportSettings()
    latency: LatencySettings = LatencySettings()

    @model_validator(mode="before")
    @classmethod
    def _shared(cls, data):
        """The run-wide seed reaches every stage that has one; `data.holdout` (the older
        spelling) is the supernet's held-out count."""
        if not isinstance(data, dict):
            return data
        data = {**data}
        for section in ("transfer", "supernet", "search", "finetune"):
            if section == "transfer" and data.get(section) is None:  # no transfer unless the recipe asks
                continue
            if isinstance(data.get(section, {}), dict):
                data[section] = {"seed": data.get("seed", 0), **data.get(section, {})}
        if isinstance(data.get("data"), dict) and "holdout" in data["data"]:
            values = {**data["data"]}
            holdout = values.pop("holdout")
            data["data"] = values
            if isinstance(data.get("supernet", {}), dict):
                data["supernet"] = {"holdout": holdout, **data.get("supernet", {})}
        return data

    @field_validator("prune")
    @classmethod
    def _known_importance(cls, prune: PruneSection) -> PruneSection:
        """Checked here, with the recipe: the registry holds the user's own importances too."""
        if prune.importance != "auto" and prune.importance not in importance_names():
            raise ValueError(f"unknown importance '{prune.importance}'; choose auto or one of "
                             f"{', '.join(importance_names())}")
        return prune

    @model_validator(mode="after")
    def _paths(self):
        if self.supernet.method == "none":
            if not self.prune.targets:
                raise ValueError("with supernet.method: none (the direct path), give prune.targets")
            if any(not (t.macs or t.params or t.latency) for t in self.prune.targets):
                raise ValueError("prune.targets take macs, params and/or latency budgets (macs: 150M or 50%, params: "
                                 "1.2M, latency: 3.5ms or 60%)")
        elif not self.search.targets:
            raise ValueError("give search.targets (e.g. - macs: 50%), or set supernet.method: none and prune.targets")
        if self.extract.weights == "teacher" and (self.supernet.method != "slimmable" or not self.trained_before()):
            raise ValueError("extract.weights: teacher cuts the searched widths from the pretrained model the "
                             "supernet was trained from: it needs supernet.method: slimmable and a trained model "
                             "(model.pretrained, a checkpoint as model.name, or a transfer section)")
        if any(t.latency for t in self.search.targets) and self.search.lut is None:
            raise ValueError("latency targets need search.lut (runtime, threads) to predict latency")
        return self

    def trained_before(self) -> bool:
        """Whether the model to compress arrives trained: pretrained weights, a checkpoint, or
        the transfer stage's model."""
        return self.model.pretrained is not None or self.transfer is not None or is_checkpoint_path(self.model.name)

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


def dump(recipe: Recipe, comments: bool = False) -> str:
    """The recipe as YAML with every default; with `comments`, each key's description beside it
    (what `chansearch run --print-config` shows). Either loads back as the same recipe."""
    data = recipe.model_dump(mode="json")
    return "".join(_commented(recipe, data, "")) if comments else yaml.safe_dump(data, sort_keys=False)


def _commented(model: BaseModel, data: dict, pad: str) -> Iterator[str]:
    for name, field in type(model).model_fields.items():
        value, raw = getattr(model, name), data[name]
        note = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):
            yield f"{pad}{name}:{note}\n"
            yield from _commented(value, raw, pad + "  ")
        elif isinstance(raw, (list, dict)) and raw:
            first, *rest = yaml.safe_dump({name: raw}, sort_keys=False).splitlines()
            yield "".join(f"{pad}{line}\n" for line in [first + note, *rest])
        else:
            yield f"{pad}{yaml.safe_dump({name: raw}, width=10_000).strip().removesuffix(chr(10) + '...')}{note}\n"
