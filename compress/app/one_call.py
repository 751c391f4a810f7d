"""`compress.compress`: a whole compression of your own model in one call, from DataLoaders:
prune (or train a supernet and search it) to a budget, recover with distillation from the
original, and report accuracy before and after."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from compress.training import distributed
from compress.models.card import card_of, describe
from compress.data.specs import holdout_indices
from compress.errors import CompressError
from compress.training.evaluate import evaluate, to_device
from compress.pruning.prune import config_for_macs, group_scores, prune_with_map, restore_outputs
from compress.search import Evaluator, HeldOut, budgets_for, run_search
from compress.settings import FinetuneSettings, PruneSettings, SearchSettings, SupernetSettings, Target
from compress.pruning.space import ChannelSpace
from compress.supernet import build_supernet, recalibrate_bn
from compress.supernet.pruningnet import pruningnet_step
from compress.supernet.slimmable import ordered_copy, sandwich_step
from compress.training.tasks import task_of
from compress.training.loop import KEEP_BEST_SHARE, Loaders, fit, kept_best
from compress.units import human

DIRECT = ("uniform", "global")
SUPERNETS = ("slimmable", "pruningnet")


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


def _first_images(loader: DataLoader, count: int, device) -> tuple[torch.Tensor, torch.Tensor | list]:
    """Up to `count` (images, targets) from the start of `loader` (targets: labels or masks, or
    a list of box targets)."""
    images, targets, seen = [], [], 0
    for x, y in loader:
        images.append(x)
        targets.append(y)
        seen += len(x)
        if seen >= count:
            break
    if isinstance(targets[0], torch.Tensor):
        return torch.cat(images)[:count].to(device), torch.cat(targets)[:count].to(device)
    return torch.cat(images)[:count].to(device), to_device([t for batch in targets for t in batch][:count], device)


def compress(model: nn.Module, example_input: torch.Tensor, constraints: dict, train_loader: DataLoader | None = None,
             val_loader: DataLoader | None = None, method: str = "global", importance: str = "auto",
             finetune: FinetuneSettings = FinetuneSettings(epochs=1), supernet: SupernetSettings | None = None,
             search: SearchSettings | None = None, out: str | Path = "runs/compress",
             quiet: bool = True, loss=None) -> tuple[nn.Module, CompressReport]:
    """Compress `model` to `constraints` ({"macs": "50%"} or 150_000_000; supernet methods also
    take "params") and recover its accuracy on `train_loader`, distilling from the original.

    `method`: "global" (channels ranked by importance across groups) or "uniform" (every
    channel group scaled alike), both keeping each group's most important channels by
    `importance` ("auto": energy measured on `train_loader`'s images when given, see
    PruneSettings, and the pruned layers refitted to the original's outputs on them); or "slimmable" /
    "pruningnet" (train a supernet on `train_loader` with `supernet` settings, then search it
    with `search` settings, scoring configs on `val_loader`'s images — so the reported
    accuracy is optimistic unless that loader is a split of its own). Returns the plain,
    smaller nn.Module (with its card) and a report; the run folder `out` keeps the training
    checkpoints. A model without a card is described from `example_input` (a square image
    batch) and its output: a classifier, a segmenter (per-pixel logits, or {"out": ...}) or a
    detector with raw head outputs (see compress.training.tasks). `loss(outputs, targets)`: your own
    task loss for the recovery, in place of the task's.
    """
    if method not in DIRECT + SUPERNETS:
        raise CompressError(f"unknown method '{method}'; choose one of {', '.join(DIRECT + SUPERNETS)}.")
    unknown = set(constraints) - {"macs", "params"}
    if unknown or not constraints:
        raise CompressError(f"constraints take 'macs' (and, for supernets, 'params'); got {sorted(constraints)}.")
    if method in DIRECT and "params" in constraints:
        raise CompressError(f"method '{method}' prunes to a MAC target; use a supernet method for 'params'.")
    if method in SUPERNETS and (train_loader is None or val_loader is None):
        raise CompressError(f"method '{method}' trains a supernet on train_loader and scores configs on val_loader; "
                            "give both.")
    model = _with_card(copy.deepcopy(model), example_input)  # the caller's model is left as it was
    out = Path(out)
    device = distributed.init()[2]
    space = ChannelSpace.from_model(model, example_input.to(next(model.parameters())))
    target = Target(**{k: str(v) for k, v in constraints.items()})
    budget = budgets_for(space, [target])[0]
    if method in DIRECT:
        settings = PruneSettings(importance=importance)
        importance = settings.importance_for(train_loader is not None)
        batch = None if train_loader is None else _first_images(
            train_loader, max(settings.reconstruct_images, settings.recal_images, 256), next(model.parameters()).device)
        scores = group_scores(model, space, importance, batch)
        config = config_for_macs(space, budget.macs, method, scores)
        small, kept = prune_with_map(model, config, space, importance=importance, scores=scores)
        if batch is not None:
            restore_outputs(model, small, kept, batch[0], settings.reconstruct_images, settings.recal_images,
                            progress=not quiet)
    else:
        small, config = _search(model, space, method, budget, train_loader, val_loader, device,
                                supernet or SupernetSettings(method=method, epochs=1),
                                search or SearchSettings(method="evolution", population=16, parents=4, mutations=8,
                                                         crossovers=8, iterations=3), out, quiet)
    small.card = card_of(model).replace(config=config.to_dict(), space=space.settings())
    full = space.max()
    report = CompressReport(method, space.macs(full), space.params(full), space.macs(config), space.params(config),
                            config.to_dict())
    key = report.metric = task_of(model).score
    if val_loader is not None:
        report.before = evaluate(model.to(device), val_loader, device)[key]
        report.pruned = evaluate(small.to(device), val_loader, device)[key]
    if train_loader is not None and finetune.epochs > 0:
        teacher = model if finetune.distill else None
        small = fit(small, _loaders(train_loader, val_loader, finetune), finetune, out / "finetune", teacher=teacher,
                    quiet=quiet, loss=loss)
        history = out / "finetune" / "metrics.jsonl"
        report.history = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
        report.kept_best = kept_best(out / "finetune")
    if val_loader is not None:
        result = evaluate(small.to(device), val_loader, device, teacher=model.to(device))
        report.fidelity = next((v for k, v in result.items() if k.startswith("fidelity_") and "pixel" not in k), None)
        if train_loader is not None and finetune.epochs > 0:
            report.after = result[key]
    # training may leave weights channels_last; hand back the layout a plain module has
    return small.cpu().to(memory_format=torch.contiguous_format).eval(), report


def _loaders(train_loader: DataLoader, val_loader: DataLoader | None, settings: FinetuneSettings) -> Loaders:
    """With keep_best, `settings.holdout` images of the training set (at most a tenth of it) are
    kept out of training, picked with the seed, to choose the best state on; the loaders are
    rebuilt around the rest with the same batch size and workers."""
    if not settings.keep_best:
        return Loaders(train_loader, val_loader)
    dataset = train_loader.dataset
    count = min(settings.holdout, int(KEEP_BEST_SHARE * len(dataset)))
    if count < 1:
        raise CompressError(f"keep_best chooses the best state on held-out training images: `holdout` is "
                            f"{settings.holdout} and a tenth of the {len(dataset)} training images is "
                            f"{int(KEEP_BEST_SHARE * len(dataset))}; give more images, or keep_best=False.")
    rest, held = (Subset(dataset, part.tolist()) for part in holdout_indices(len(dataset), count, settings.seed))
    options = dict(batch_size=train_loader.batch_size, num_workers=train_loader.num_workers,
                   collate_fn=train_loader.collate_fn)
    return Loaders(DataLoader(rest, shuffle=True, drop_last=train_loader.drop_last, **options), val_loader,
                   DataLoader(held, **options))


def _with_card(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    if getattr(model, "card", None) is not None:
        return model
    if example_input.dim() != 4 or example_input.shape[-1] != example_input.shape[-2]:
        raise CompressError(f"example_input must be a square image batch (N, C, S, S); got "
                            f"{tuple(example_input.shape)}.")
    return describe(model, input_size=example_input.shape[-1])


def _search(model, space, method, budget, train_loader, val_loader, device, supernet: SupernetSettings,
            search: SearchSettings, out: Path, quiet: bool):
    """Train a supernet from `model` on `train_loader`, search it under `budget`, and return
    the extracted net of the best config with that config."""
    teacher = copy.deepcopy(model) if supernet.distill else None  # the supernet wraps `model` in place
    if supernet.reorder:  # largest channels first, so the narrow configs start from what the model knew
        model = ordered_copy(model, "l1", None)
    net = build_supernet(model, method, divisor=space.divisor, min_width=space.min_ratio, hidden=supernet.hidden,
                         affine_bn=True)
    if method == "slimmable":
        step = sandwich_step(net, num_random=supernet.num_random, uniform=supernet.uniform, distill=supernet.distill,
                             label_smoothing=supernet.label_smoothing, teacher=teacher)
    else:
        net.fit_pretrained()
        step = pruningnet_step(net, label_smoothing=supernet.label_smoothing)
    if supernet.epochs > 0:
        net = fit(net, Loaders(train_loader), supernet, out / "supernet", step=step, validate=False, quiet=quiet)
    held = HeldOut(val_loader.dataset, search.recal_images, search.eval_images, seed=search.seed)
    evaluator = Evaluator(net, held, device)
    result = run_search(evaluator, search.method, [budget], seed=search.seed, options=search.strategy_options())
    config = space.validate(result["targets"][0]["config"])
    recalibrate_bn(net, config, held.batches("recal"), device)
    return net.extract(config), config
