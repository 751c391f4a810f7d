"""The supernet stage: a model wrapped as a slimmable network or a PruningNet, trained on the
data source, saved with a record of the held-out images its configs are scored on, and the
held-out images themselves for the stages after it."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compress.checkpoint import save_checkpoint
from compress.data.source import DataSource
from compress.data.specs import train_holdout
from compress.errors import CompressError
from compress.files import atomic_write_json
from compress.models.card import card_of
from compress.search import Evaluator, HeldOut
from compress.settings import HeldOutScoring, PruneSettings, SupernetSettings
from compress.stages.folders import device, run_folder
from compress.stages.pruning import pruning_batch
from compress.supernet import Supernet, build_supernet, load_supernet, recalibrate_bn, save_supernet
from compress.supernet.pruningnet import pruningnet_step
from compress.supernet.slimmable import ordered_copy, sandwich_step
from compress.training import distributed
from compress.training.loop import fit


@dataclass
class SupernetRun:
    supernet: Supernet
    checkpoint: Path
    summary: dict  # held-out top-1 and MACs of the max and min configs


def train_supernet(model: nn.Module, data, settings: SupernetSettings, out: str | Path,
                   scoring: HeldOutScoring = HeldOutScoring(), pretrained: bool = False, resume: bool = False,
                   quiet: bool = False, record: dict | None = None,
                   ranking: PruneSettings = PruneSettings()) -> SupernetRun:
    """Wrap `model` as a slimmable network or PruningNet and train it on `data` (a spec: holding
    out `settings.holdout` training images for the search; your own Loaders: their `val`
    loader is what configs are scored on); then score its max and min configs. `pretrained`
    starts from the model's weights (slimmable: most important channels first, as `prune` with
    `ranking` and `data` ranks them, every config distilled from the frozen pretrained model
    when `settings.distill`; PruningNet: hypernetworks fitted to reproduce them)."""
    if settings.method == "none":
        raise CompressError("supernet `method` none trains no supernet; choose slimmable or pruningnet.")
    source = DataSource.of(data)
    if source.spec is not None and settings.holdout <= 0:
        raise CompressError("`holdout` must be positive: the search scores configs on held-out training images.")
    if source.spec is None and source.loaders.val is None:
        raise CompressError("a supernet trained on your own loaders scores its configs on Loaders(train, val): give "
                            "a `val` loader of images it does not train on.")
    out = Path(out)
    with run_folder(out, resume, record):
        teacher = copy.deepcopy(model) if pretrained and settings.distill else None  # wrapped in place below
        if pretrained and settings.reorder:
            # ordered as `prune --data` ranks them, on its images: a searched config can then
            # be cut from the pretrained model keeping the channels the supernet scored
            model = ordered_copy(model, ranking.importance_for(True), pruning_batch(model, ranking, source))
        supernet = build_supernet(model, settings.method, divisor=settings.divisor, min_width=settings.min_width,
                                  hidden=settings.hidden, affine_bn=pretrained)
        if settings.method == "slimmable":
            step = sandwich_step(supernet, num_random=settings.num_random, uniform=settings.uniform,
                                 distill=settings.distill, label_smoothing=settings.label_smoothing, teacher=teacher)
        else:
            if pretrained:
                supernet.fit_pretrained()
            step = pruningnet_step(supernet, label_smoothing=settings.label_smoothing)
        # A PruningNet keeps no BN statistics while training; it is scored after recalibration below.
        trained = fit(supernet, source, settings, out, step=step, resume=resume, quiet=quiet,
                      validate=settings.method == "slimmable")
        count = settings.holdout if source.spec else len(source.loaders.val.dataset)
        holdout = {"data": source.spec, "count": count, "seed": settings.seed}
        path = out / "supernet.pt"
        if distributed.is_main():
            save_supernet(path, trained, holdout, provenance={"epochs": settings.epochs, "pretrained": pretrained})
        evaluator = Evaluator(trained, held_out(trained, holdout, scoring, source), device())
        space = trained.space
        summary = {name: {k: v for k, v in e.items() if k != "config"}
                   for name, e in zip(("max", "min"), evaluator.score_many([space.max(), space.min()]))}
        if distributed.is_main():
            atomic_write_json(out / "supernet_eval.json", summary)
    distributed.barrier()
    return SupernetRun(trained, path, summary)


def held_out(supernet: Supernet, holdout: dict, scoring: HeldOutScoring, data=None) -> HeldOut:
    """The held-out images a supernet's configs are scored on: the training images it was
    trained without (`data`: the same spec at another path), or the `val` loader's images of
    your own Loaders."""
    source = DataSource.of(data) if data is not None else None
    if source is not None and source.spec is None:
        return HeldOut(source.loaders.val.dataset, scoring.recal_images, scoring.eval_images, seed=holdout["seed"])
    if not holdout.get("count"):
        raise CompressError("this supernet was trained without held-out images (`holdout` 0); the search "
                            "scores configs on held-out training images. Retrain with `holdout` > 0.")
    spec = source.spec if source is not None else holdout["data"]
    if spec is None:
        raise CompressError("this supernet was trained on your own DataLoaders; pass the same data "
                            "(data=Loaders(train, val)) to score its configs.")
    card = card_of(supernet)
    _, held, _ = train_holdout(spec, scoring.score_size or card.input_size, card.mean, card.std,
                               card.label_classes, holdout["count"], holdout["seed"])
    return HeldOut(held, scoring.recal_images, scoring.eval_images, seed=holdout["seed"])


def supernet_file(run: str | Path) -> Path:
    run = Path(run)
    path = run / "supernet.pt" if run.is_dir() else run
    if not path.is_file():
        raise CompressError(f"'{run}' holds no supernet.pt; pass the run folder of a trained supernet.")
    return path


def supernet_teacher(run: str | Path, scoring: HeldOutScoring, output: str | Path) -> Path:
    """The supernet's full config as a standalone checkpoint (BN recalibrated): the teacher
    its extracted nets distil from."""
    supernet, record = load_supernet(supernet_file(run))
    held = held_out(supernet, record["holdout"], scoring.model_copy(update={"score_size": None}))  # its own size
    recalibrate_bn(supernet, supernet.space.max(), held.batches("recal"))
    save_checkpoint(output, supernet.extract(supernet.space.max()),
                    provenance={"created_by": "supernet full config", "supernet": str(run)})
    return Path(output)
