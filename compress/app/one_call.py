"""`compress.compress`: a whole compression of your own model in one call, from DataLoaders:
prune (or train a supernet and search it) to a budget, recover with distillation from the
original, and report the task's metric before and after. A front end over the stage API, as
the CLI and the recipe runner are: every step is a `compress.stages` call on the user's
loaders as the data source."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from compress import stages
from compress.data.source import DataSource, Loaders
from compress.errors import CompressError
from compress.models.card import card_of, describe
from compress.pruning.profile import count
from compress.settings import (FinetuneSettings, HeldOutScoring, LutSettings, PruneSettings, SearchSettings,
                               SupernetSettings, Target)
from compress.stages.folders import move_aside
from compress.training import distributed
from compress.training.evaluate import evaluate
from compress.training.keep_best import kept_best
from compress.training.tasks import task_of
from compress.units import human

DIRECT = ("uniform", "global")
SUPERNETS = ("slimmable", "pruningnet")
STAGE_FOLDERS = ("supernet", "lut", "search", "extract", "finetune")


@dataclass
class CompressReport:
    method: str
    macs_before: int
    params_before: int
    macs: int
    params: int
    config: dict
    metric: str = "top1"  # the task's: top1, miou (segmentation) or map (detection)
    before: float | None = None  # the original model on the validation loader
    pruned: float | None = None  # the compressed model before recovery
    after: float | None = None  # after recovery
    fidelity: float | None = None  # after recovery, against the original's predictions (needs no labels)
    history: list[dict] = field(default_factory=list)
    kept_best: dict | None = None  # keep_best: the step and held-out scores of the state returned, and the start's

    def __str__(self) -> str:
        def pct(v):
            return "-" if v is None else f"{v:.2%}"
        return (f"{self.method}: {human(self.macs_before)} -> {human(self.macs)} MACs "
                f"({self.macs / self.macs_before:.1%}), {human(self.params_before)} -> {human(self.params)} params; "
                f"{self.metric} {pct(self.before)} original, {pct(self.pruned)} compressed, "
                f"{pct(self.after)} after recovery, fidelity {pct(self.fidelity)}" + ("" if not self.kept_best else
                f" (the best state, step {self.kept_best['step']}: held-out {self.metric} "
                f"{self.kept_best['start']['top1']:.2%} -> {self.kept_best['top1']:.2%})"))


def compress(model: nn.Module, example_input: torch.Tensor, constraints: dict, train_loader: DataLoader | None = None,
             val_loader: DataLoader | None = None, method: str = "global", importance: str = "auto",
             finetune: FinetuneSettings = FinetuneSettings(epochs=1), supernet: SupernetSettings | None = None,
             search: SearchSettings | None = None, out: str | Path = "runs/compress",
             quiet: bool = True, loss=None, clock: LutSettings = LutSettings()) -> tuple[nn.Module, CompressReport]:
    """Compress `model` to `constraints` ({"macs": "50%"}, {"params": 1_200_000}, {"latency":
    "3.5ms" or "60%"}, or several: all are met) and recover its accuracy on `train_loader`,
    distilling from the original. A latency is measured on `clock` (runtime, int8, threads):
    the direct methods prune until the exported file runs within 5% under it; the supernet
    methods search with a latency model built on it.

    `method`: "global" (channels ranked by importance across groups) or "uniform" (every
    channel group scaled alike), both keeping each group's most important channels by
    `importance` ("auto": energy measured on `train_loader`'s images when given, see
    PruneSettings, and the pruned layers refitted to the original's outputs on them): the
    prune stage, `compress.prune`; or "slimmable" / "pruningnet": the supernet, search and
    extract stages (train a supernet on `train_loader` with `supernet` settings, its channels
    ordered as the prune stage ranks them, then search it with `search` settings, scoring
    configs on `val_loader`'s images, so the reported accuracy is optimistic unless that
    loader is a split of its own). Returns the plain, smaller nn.Module (with its card) and a
    report; the run folder `out` keeps each stage's folder (an earlier call's are moved to
    `<stage>.previous`). A model without a card is described from `example_input` (a square
    image batch) and its output: a classifier, a segmenter (per-pixel logits, or {"out":
    ...}) or a detector with raw head outputs (see compress.training.tasks). `loss(outputs,
    targets)`: your own task loss for the recovery, in place of the task's.
    """
    _check(constraints, method, train_loader, val_loader)
    model = _with_card(copy.deepcopy(model), example_input)  # the caller's model is left as it was
    out = Path(out)
    device = distributed.init()[2]
    data = DataSource.of(Loaders(train_loader, val_loader)) if train_loader is not None else None
    target = Target(**{k: str(v) for k, v in constraints.items()})
    if distributed.is_main():
        for name in STAGE_FOLDERS:
            move_aside(out / name)
    distributed.barrier()
    ranking = PruneSettings(importance=importance, strategy=method if method in DIRECT else "global")
    if method in DIRECT:
        small = stages.prune(model, ranking, macs=target.macs, params=target.params, latency=target.latency,
                             clock=clock, data=data, progress=not quiet).model
    else:
        small = _searched(model, method, target, data, ranking, supernet, search, out, quiet, clock)
    size = card_of(model).input_size
    report = CompressReport(method, *count(model, size), *count(small, size), dict(small.card.config))
    key = report.metric = task_of(model).score
    if val_loader is not None:
        report.before = evaluate(model.to(device), val_loader, device)[key]
        report.pruned = evaluate(small.to(device), val_loader, device)[key]
    if train_loader is not None and finetune.epochs > 0:
        done = stages.train(small, data, finetune, out / "finetune", teacher=model if finetune.distill else None,
                            quiet=quiet, loss=loss)
        small, report.history, report.kept_best = done.model, done.history, kept_best(out / "finetune")
    if val_loader is not None:
        result = evaluate(small.to(device), val_loader, device, teacher=model.to(device))
        report.fidelity = next((v for k, v in result.items() if k.startswith("fidelity_") and "pixel" not in k), None)
        if train_loader is not None and finetune.epochs > 0:
            report.after = result[key]
    # training may leave weights channels_last; hand back the layout a plain module has
    return small.cpu().to(memory_format=torch.contiguous_format).eval(), report


def _check(constraints: dict, method: str, train_loader: DataLoader | None, val_loader: DataLoader | None) -> None:
    if method not in DIRECT + SUPERNETS:
        raise CompressError(f"unknown method '{method}'; choose one of {', '.join(DIRECT + SUPERNETS)}.")
    unknown = set(constraints) - {"macs", "params", "latency"}
    if unknown or not constraints:
        raise CompressError(f"constraints take 'macs', 'params' (counts or percentages of the model) and 'latency' "
                            f"(3.5ms, or a percentage of the model's measured time); got {sorted(constraints)}.")
    if method in SUPERNETS and (train_loader is None or val_loader is None):
        raise CompressError(f"method '{method}' trains a supernet on train_loader and scores configs on val_loader; "
                            "give both.")


def _with_card(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    if getattr(model, "card", None) is not None:
        return model
    if example_input.dim() != 4 or example_input.shape[-1] != example_input.shape[-2]:
        raise CompressError(f"example_input must be a square image batch (N, C, S, S); got "
                            f"{tuple(example_input.shape)}.")
    return describe(model, input_size=example_input.shape[-1])


def _searched(model: nn.Module, method: str, target: Target, data: DataSource, ranking: PruneSettings,
              supernet: SupernetSettings | None, search: SearchSettings | None, out: Path, quiet: bool,
              clock: LutSettings) -> nn.Module:
    """The supernet, search and extract stages on the user's loaders: the extracted net of the
    config the search chose for `target`."""
    settings = (supernet or SupernetSettings(epochs=1)).model_copy(update={"method": method})
    search = (search or SearchSettings(method="evolution", population=16, parents=4, mutations=8, crossovers=8,
                                       iterations=3)).model_copy(update={"targets": [target]})
    scoring = HeldOutScoring(**search.model_dump(include=set(HeldOutScoring.model_fields)))
    stages.train_supernet(copy.deepcopy(model), data, settings, out / "supernet", scoring=scoring, pretrained=True,
                          quiet=quiet, ranking=ranking)
    lut = None
    if target.latency:
        lut = out / "lut" / "lut.json"
        stages.latency_table(*stages.lut_model_space(out / "supernet"), clock, lut, progress=not quiet)
    stages.search(out / "supernet", search, out=out / "search", data=data, quiet=quiet, model=model, lut=lut)
    return stages.extract(out / "supernet", out / "extract" / "model.pt", search_dir=out / "search", data=data,
                          model=model).model
