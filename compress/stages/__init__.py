"""The stage API: one function per stage of the pipeline (train / fine-tune, supernet, search,
extract, prune, export, latency, latency table), each taking the settings model of its
recipe section and returning a typed result. `chansearch` and the recipe runner are thin
front ends over these; a Python program calls them directly.

Every stage that writes a run folder locks it for the run and refuses to start a new run
over an old one (resume it instead); every file it writes is written atomically.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compress.training import distributed
from compress.models.card import card_of
from compress.checkpoint import save_checkpoint
from compress.data.specs import check_task, sample_images, sample_labelled, train_holdout
from compress.errors import CompressError
from compress.training.evaluate import evaluate, to_device
from compress.export.latency import measure, measure_adb
from compress.export.onnx import export_onnx
from compress.export.tflite import export_tflite
from compress.files import RunLock, atomic_write_json
from compress.logs import notes
from compress.pruning.profile import count
from compress.pruning.prune import DATA_DRIVEN, prune_target, restore_outputs
from compress.search import RESULT_FILE, Evaluator, HeldOut, budgets_for, run_search, write_results
from compress.search.latency_table import LatencyTable, build_table, check_table, latency_predictor, measure_configs
from compress.settings import (DataSettings, ExportSettings, FinetuneSettings, HeldOutScoring, LatencySettings,
                               LutSettings, PruneSettings, SearchSettings, SupernetSettings, TrainSettings)
from compress.pruning.space import ChannelSpace, example_input
from compress.supernet import Supernet, build_supernet, load_supernet, recalibrate_bn, save_supernet
from compress.supernet.pruningnet import pruningnet_step
from compress.supernet.slimmable import ordered_copy, sandwich_step
from compress.training.loop import STATE_FILE, Loaders, fit
from compress.units import parse_count

__all__ = ["Extracted", "Pruned", "SearchRun", "SupernetRun", "Trained", "export", "extract",
           "latency", "latency_table", "prune", "search", "train", "train_supernet"]


ARGS_FILE = "args.json"


def device() -> torch.device:
    return distributed.init()[2] if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def run_folder(out: str | Path, resume: bool, record: dict | None = None) -> Iterator[Path]:
    """Hold `out` for one run (rank 0 locks it): a new run refuses a folder that already holds
    one; `record` (what started the run, for resuming it) is written on a new run."""
    out = Path(out)
    distributed.init()
    if not distributed.is_main():
        yield out
        return
    with RunLock(out):
        if not resume and (out / STATE_FILE).exists():
            raise CompressError(f"run folder '{out}' already holds a run; resume it (`resume`), or choose another "
                                "folder.")
        if record is not None and not resume:
            atomic_write_json(out / ARGS_FILE, record)
        yield out


# ---- train / fine-tune ----------------------------------------------------------------------
@dataclass
class Trained:
    model: nn.Module
    checkpoint: Path
    history: list[dict] = field(default_factory=list)


def train(model: nn.Module, data: DataSettings | Loaders, settings: TrainSettings | FinetuneSettings,
          out: str | Path, output: str | Path | None = None, teacher: nn.Module | None = None,
          resume: bool = False, quiet: bool = False, provenance: dict | None = None,
          record: dict | None = None) -> Trained:
    """Train (or fine-tune, with a teacher to distil from) `model` in run folder `out`; the
    trained checkpoint goes to `output` (default `out/model.pt`). `resume` continues an
    interrupted run exactly."""
    out = Path(out)
    output = Path(output) if output else out / "model.pt"
    with run_folder(out, resume, record):
        trained = fit(model, data, settings, out, teacher=teacher, resume=resume, quiet=quiet)
        if distributed.is_main():
            data_name = data.spec if isinstance(data, DataSettings) else "DataLoader"
            save_checkpoint(output, trained, provenance={"data": data_name, "epochs": settings.epochs,
                                                         **(provenance or {})})
    distributed.barrier()
    metrics = out / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return Trained(trained, output, history)


# ---- supernet -------------------------------------------------------------------------------
@dataclass
class SupernetRun:
    supernet: Supernet
    checkpoint: Path
    summary: dict  # held-out top-1 and MACs of the max and min configs


def train_supernet(model: nn.Module, data: DataSettings, settings: SupernetSettings, out: str | Path,
                   scoring: HeldOutScoring = HeldOutScoring(), pretrained: bool = False, resume: bool = False,
                   quiet: bool = False, record: dict | None = None,
                   ranking: PruneSettings = PruneSettings()) -> SupernetRun:
    """Wrap `model` as a slimmable network or PruningNet and train it on `data` (holding out
    `settings.holdout` training images for the search); then score its max and min configs.
    `pretrained` starts from the model's weights (slimmable: most important channels first, as
    `prune` with `ranking` and `data` ranks them, every config distilled from the frozen
    pretrained model when `settings.distill`; PruningNet: hypernetworks fitted to reproduce
    them)."""
    if settings.method == "none":
        raise CompressError("supernet `method` none trains no supernet; choose slimmable or pruningnet.")
    if settings.holdout <= 0:
        raise CompressError("`holdout` must be positive: the search scores configs on held-out training images.")
    out = Path(out)
    with run_folder(out, resume, record):
        teacher = copy.deepcopy(model) if pretrained and settings.distill else None  # wrapped in place below
        if pretrained and settings.reorder:
            # ordered as `prune --data` ranks them, on its images: a searched config can then
            # be cut from the pretrained model keeping the channels the supernet scored
            model = ordered_copy(model, ranking.importance_for(True), pruning_batch(model, ranking, data.spec))
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
        trained = fit(supernet, data, settings, out, step=step, resume=resume, quiet=quiet,
                      validate=settings.method == "slimmable")
        holdout = {"data": data.spec, "count": settings.holdout, "seed": settings.seed}
        path = out / "supernet.pt"
        if distributed.is_main():
            save_supernet(path, trained, holdout, provenance={"epochs": settings.epochs, "pretrained": pretrained})
        evaluator = Evaluator(trained, held_out(trained, holdout, scoring), device())
        space = trained.space
        summary = {name: {k: v for k, v in e.items() if k != "config"}
                   for name, e in zip(("max", "min"), evaluator.score_many([space.max(), space.min()]))}
        if distributed.is_main():
            atomic_write_json(out / "supernet_eval.json", summary)
    distributed.barrier()
    return SupernetRun(trained, path, summary)


def held_out(supernet: Supernet, holdout: dict, scoring: HeldOutScoring, data: str | None = None) -> HeldOut:
    """The held-out training images a supernet was trained without (`data`: the same data
    at another path)."""
    if not holdout.get("count"):
        raise CompressError("this supernet was trained without held-out images (`holdout` 0); the search "
                            "scores configs on held-out training images. Retrain with `holdout` > 0.")
    card = card_of(supernet)
    _, held, _ = train_holdout(data or holdout["data"], scoring.score_size or card.input_size, card.mean, card.std,
                               card.num_classes, holdout["count"], holdout["seed"])
    return HeldOut(held, scoring.recal_images, scoring.eval_images, seed=holdout["seed"])


# ---- search / extract -----------------------------------------------------------------------
@dataclass
class SearchRun:
    result: dict  # what search.json holds: per target its config, MACs, params, held-out top-1
    folder: Path
    evaluator: Evaluator


def supernet_file(run: str | Path) -> Path:
    run = Path(run)
    path = run / "supernet.pt" if run.is_dir() else run
    if not path.is_file():
        raise CompressError(f"'{run}' holds no supernet.pt; pass the run folder of a trained supernet.")
    return path


def open_search(run: str | Path, scoring: HeldOutScoring, folder: Path, data: str | None = None,
                lut: str | Path | None = None) -> tuple[Supernet, dict, Evaluator]:
    """The supernet of run folder `run`, its record, and an Evaluator whose cache (the search
    state) lives in `folder`, fingerprinted with everything its scores depend on."""
    path = supernet_file(run)
    supernet, record = load_supernet(path)
    fingerprint = {"supernet": _digest(path), "data": data or record["holdout"]["data"],
                   "holdout": record["holdout"]["count"], "holdout_seed": record["holdout"]["seed"],
                   "recal_images": scoring.recal_images, "eval_images": scoring.eval_images,
                   **({"score_size": scoring.score_size} if scoring.score_size else {})}
    latency = None
    if lut:
        latency = latency_predictor(lut, supernet.space)
        fingerprint["lut"] = _digest(Path(lut))
    evaluator = Evaluator(supernet, held_out(supernet, record["holdout"], scoring, data), device(), latency=latency,
                          state_path=folder / "state.json", fingerprint=fingerprint)
    return supernet, record, evaluator


def search(run: str | Path, settings: SearchSettings, out: str | Path | None = None, lut: str | Path | None = None,
           data: str | None = None, quiet: bool = False) -> SearchRun:
    """Search the supernet of run folder `run` for one config per target of `settings`;
    results (search.json, search.csv, search.png, the resumable state.json) go to `out`
    (default RUN/search-METHOD). With latency targets, `lut` predicts latency and the chosen
    configs are then timed for real."""
    run = Path(run)
    folder = Path(out) if out else (run if run.is_dir() else run.parent) / f"search-{settings.method}"
    if any(t.latency_ms for t in settings.targets) and not lut:
        raise CompressError("`latency_ms` needs `lut`, a latency table of this space; build one with "
                            "`chansearch lut`.")
    distributed.init()
    supernet, _, evaluator = open_search(run, settings, folder, data, lut)
    budgets = budgets_for(supernet.space, settings.targets, evaluator.latency)
    log = None if quiet or not distributed.is_main() else (lambda msg: print(msg, flush=True))
    if log and evaluator.cache:
        log(f"resuming: {len(evaluator.cache)} configs already scored in {folder / 'state.json'}")
    result = run_search(evaluator, settings.method, budgets, seed=settings.seed, options=settings.strategy_options(),
                        progress=log)
    result.update(supernet=str(run), evaluation=evaluator.fingerprint)
    if lut:
        _measure_finalists(result, supernet, lut)
    write_results(folder, result, evaluator)
    distributed.barrier()
    return SearchRun(result, folder, evaluator)


def _measure_finalists(result: dict, supernet: Supernet, lut: str | Path) -> None:
    """The latency table screened the candidates; time each chosen config for real."""
    table = LatencyTable.load(lut, supernet.space).record
    measured = measure_configs(supernet.plain_copy(), supernet.space, [t["config"] for t in result["targets"]],
                               table["backend"], table["threads"])
    for t, ms in zip(result["targets"], measured):
        limit = t["budget"]["latency_ms"]
        t.update(measured_ms=ms, measured_backend=table["backend"], measured_within_budget=limit is None or ms <= limit)
        if not t["measured_within_budget"]:
            print(f"warning: {t['label']}: measured {ms:.3f} ms on {table['backend']} is over the {limit} ms budget "
                  f"(predicted {t['latency_ms']:.3f} ms); tighten the latency budget or rebuild the table on a quiet "
                  "machine.", file=sys.stderr)


def find_search(run: str | Path, search_dir: str | Path | None = None) -> Path:
    """The one search folder of a supernet run (or `search_dir`), holding search.json."""
    if search_dir:
        path = Path(search_dir)
        if not (path / RESULT_FILE).is_file():
            raise CompressError(f"'{path}' holds no {RESULT_FILE}; run the search first.")
        return path
    found = sorted(p.parent for p in Path(run).glob(f"search-*/{RESULT_FILE}"))
    if not found:
        raise CompressError(f"'{run}' holds no search results (search-*/{RESULT_FILE}); run the search first.")
    if len(found) > 1:
        raise CompressError(f"'{run}' holds several searches ({', '.join(p.name for p in found)}); "
                            "choose one (`search`).")
    return found[0]


def search_target(result: dict, target: str | None, where: str = RESULT_FILE) -> dict:
    """One target of a search result, by its label (`macs<=150.00M`), its limit (`150.00M`)
    or a MAC count / percentage within 0.1% of its MAC budget."""
    targets = result["targets"]
    if target is None:
        if len(targets) != 1:
            raise CompressError(f"{where} has {len(targets)} targets ({', '.join(t['label'] for t in targets)}); "
                                "pick one (`target`).")
        return targets[0]
    wanted = [t for t in targets if target in (t["label"], t["label"].split("<=")[-1])]
    if not wanted and all(t["budget"]["macs"] for t in targets):
        full = result["full"]["macs"]
        macs = parse_count(target, "MAC target", full=full)
        wanted = [t for t in targets if abs(t["budget"]["macs"] - macs) <= 0.001 * full]
    if not wanted:
        raise CompressError(f"no target '{target}' in {where}; it has {', '.join(t['label'] for t in targets)}.")
    return wanted[0]


@dataclass
class Extracted:
    model: nn.Module
    checkpoint: Path
    target: dict  # the search's entry: label, budget, config, MACs, held-out top-1
    heldout_top1: float  # the extracted net's own on the same held-out images (the search's score, cut
    # from the supernet; its own, cut from the teacher)


def extract(run: str | Path, output: str | Path, target: str | None = None,
            search_dir: str | Path | None = None, provenance: dict | None = None,
            teacher: nn.Module | None = None, prune_settings: PruneSettings = PruneSettings()) -> Extracted:
    """The searched config of `target` as a standalone pruned checkpoint: BN recalibrated on
    the search's held-out images, outputs equal to the supernet's at that config. With
    `teacher` (the unpruned pretrained model the supernet was trained from), the config is
    cut from the teacher's own weights instead, the way `prune --data` cuts a config
    (`prune_settings`, on the supernet's training data): the search chose the widths, the
    teacher keeps its weights."""
    folder = find_search(run, search_dir)
    result = json.loads((folder / RESULT_FILE).read_text())
    entry = search_target(result, target, str(folder / RESULT_FILE))
    evaluation = result["evaluation"]
    # recalibrated and scored at the model's own input size, whatever size the search scored at
    scoring = HeldOutScoring(recal_images=evaluation["recal_images"], eval_images=evaluation["eval_images"])
    supernet, record = load_supernet(supernet_file(run))
    same_size = evaluation.get("score_size") in (None, supernet.card.input_size)
    held = held_out(supernet, record["holdout"], scoring, evaluation["data"])
    provenance = {"created_by": "extract", "supernet": str(run), "method": record["method"], "search": str(folder),
                  "target": entry["label"], "heldout_top1": entry["top1"], **(provenance or {})}
    if teacher is not None:
        if card_of(teacher).arch != supernet.card.arch or card_of(teacher).pruned:
            raise CompressError(f"--teacher must be the unpruned model the supernet '{run}' was trained from "
                                f"({supernet.card.arch}); got {card_of(teacher).arch}"
                                f"{' (pruned)' if card_of(teacher).pruned else ''}. Pass that model's checkpoint.")
        cut = prune(teacher, prune_settings, config=entry["config"], data=evaluation["data"])
        model = cut.model
        scored = evaluate(model, held.batches("eval"), device(), distributed_sum=False)["top1"]
        save_checkpoint(output, model, provenance={**provenance, **cut.restored, "weights": "teacher",
                                                   "heldout_top1_extracted": scored})
        return Extracted(model, Path(output), entry, scored)
    supernet.to(device())
    recalibrate_bn(supernet, entry["config"], held.batches("recal"), device())
    model = supernet.extract(entry["config"])
    # the extracted net must score what the search said it would, on the same images
    scored = evaluate(model, held.batches("eval"), device(), distributed_sum=False)["top1"]
    images = len(held.eval)
    noise = 3 * math.sqrt(max(entry["top1"] * (1 - entry["top1"]), 1e-4) / max(images, 1)) + 0.005
    if same_size and abs(scored - entry["top1"]) > noise:
        notes.warning(f"the extracted net of {entry['label']} scores {scored:.2%} held-out top-1, where the search "
                      f"scored its config at {entry['top1']:.2%} on the same {images} images: the supernet's "
                      "shared weights at this config are not the extracted net's. Report this with the run folder.")
    save_checkpoint(output, model, provenance={**provenance, "heldout_top1_extracted": scored})
    return Extracted(model, Path(output), entry, scored)


def supernet_teacher(run: str | Path, scoring: HeldOutScoring, output: str | Path) -> Path:
    """The supernet's full config as a standalone checkpoint (BN recalibrated): the teacher
    its extracted nets distil from."""
    supernet, record = load_supernet(supernet_file(run))
    held = held_out(supernet, record["holdout"], scoring.model_copy(update={"score_size": None}))  # its own size
    recalibrate_bn(supernet, supernet.space.max(), held.batches("recal"))
    save_checkpoint(output, supernet.extract(supernet.space.max()),
                    provenance={"created_by": "supernet full config", "supernet": str(run)})
    return Path(output)


# ---- prune ----------------------------------------------------------------------------------
@dataclass
class Pruned:
    model: nn.Module
    checkpoint: Path | None
    macs_before: int
    params_before: int
    macs: int
    params: int
    restored: dict = field(default_factory=dict)  # what restore_outputs did


def prune(model: nn.Module, settings: PruneSettings, macs: str | int | None = None, config=None,
          width: float | None = None, output: str | Path | None = None, provenance: dict | None = None,
          data: str | None = None, progress: bool = False) -> Pruned:
    """Prune to a MAC target, a channel config (or its JSON file) or a uniform width, keeping
    each group's most important channels (`settings.importance`). With `data`, importance is
    measured on its training images and the pruned layers are refitted to the unpruned outputs
    on them (or BN re-estimated; `restore_outputs`). Saved to `output` if given."""
    importance = settings.importance_for(bool(data))
    restored = {}
    batch = pruning_batch(model, settings, data) if data else None
    pruned, info = prune_target(model, config=config, macs=macs, width=width, importance=importance,
                                strategy=settings.strategy, divisor=settings.divisor, batch=batch)
    if batch is not None:
        restored = restore_outputs(model, pruned, info["kept"], batch[0], settings.reconstruct_images,
                                   settings.recal_images, progress=progress)
    record = None
    if output is not None:
        record = save_checkpoint(output, pruned, provenance={
            "created_by": "prune", "importance": importance, "strategy": info["strategy"],
            "target_macs": info.get("target_macs"), **restored, **(provenance or {})})
    macs_after, params_after = ((record["macs"], record["params"]) if record else
                                count(pruned, card_of(pruned).input_size))
    return Pruned(pruned, Path(output) if output else None, info["macs_before"], info["params_before"],
                  macs_after, params_after, restored)


def pruning_batch(model: nn.Module, settings: PruneSettings, data: str):
    """The training images (and labels) `prune` measures importance and refits on, or None
    when `settings` needs none; seeded, so every caller sees the same ones."""
    wanted = max(settings.reconstruct_images, settings.recal_images)
    if not (wanted or settings.importance_for(True) in DATA_DRIVEN):
        return None
    card = card_of(model)
    check_task(data, card.task)
    images, labels = sample_labelled(data, True, wanted or 256, card.input_size, card.mean, card.std, seed=0)
    device = next(model.parameters()).device
    return images.to(device), to_device(labels, device)


# ---- export / latency -----------------------------------------------------------------------
def export(model: nn.Module, fmt: str, output: str | Path, settings: ExportSettings = ExportSettings(),
           data: str | None = None, input_size: int | None = None) -> dict:
    """Write `model` as ONNX or TFLite, float or quantized (`settings.quantize`), and check it
    against PyTorch on real, labelled images of `data` (its evaluation split; its training
    split calibrates static int8), else on a fixed random batch. Returns the export report;
    CheckFailed (carrying the report) when parity fails. Inputs are checked before any file
    is written."""
    if fmt not in ("onnx", "tflite"):
        raise CompressError(f"unknown export format '{fmt}'; choose onnx or tflite.")
    mode = settings.quantize
    if fmt == "onnx" and (settings.nhwc or settings.keep_float or mode in ("int8_io", "dynamic_range")):
        raise CompressError("`nhwc`, `int8_io`, `dynamic_range` and `keep_float` are TFLite options; an ONNX "
                            "export is float or `int8` (static QDQ with float input/output).")
    if mode in ("int8", "int8_io") and not data:
        raise CompressError(f"`{mode}` needs calibration images: give real data (`calib_data`); its training split "
                            "calibrates, its evaluation split checks parity.")
    card = card_of(model)
    size = input_size or card.input_size
    images = labels = calib = None
    if data:
        check_task(data, card.task)
        images, labels = sample_labelled(data, False, settings.parity_images, size, card.mean, card.std, seed=1)
        labels = labels if card.task == "classify" else None  # accuracy in the parity report is top-1
        if mode in ("int8", "int8_io") or (mode and settings.bias_correction):  # calibration; bias correction
            calib = sample_images(data, True, settings.calib_images, size, card.mean, card.std)
    # Agreement is enforced on real images only: on random ones a float model's top-1 is arbitrary.
    floor = settings.agreement_floor if data else settings.min_agreement
    if fmt == "onnx":
        return export_onnx(model, output, size, opset=settings.opset, images=images, labels=labels,
                           tolerance=settings.tolerance, quantize=mode, calib_images=calib, min_agreement=floor,
                           bias_correction=settings.bias_correction)
    return export_tflite(model, output, size, quantize=mode, calib_images=calib, images=images, labels=labels,
                         nhwc=settings.nhwc, tolerance=settings.tolerance, min_agreement=floor,
                         keep_float=settings.keep_float, bias_correction=settings.bias_correction)


def latency(path: str | Path, settings: LatencySettings = LatencySettings()) -> dict:
    """Time an .onnx / .tflite file here or on a phone over adb; with `settings.budget_ms`,
    `within_budget` says whether the median met it."""
    options = dict(threads=settings.threads, warmup=settings.warmup, runs=settings.runs)
    if settings.device == "local":
        result = measure(path, settings.backend, **options)
    else:
        result = measure_adb(path, settings.device.partition(":")[2] or None, binary=settings.benchmark_binary,
                             use_xnnpack=settings.xnnpack, taskset=settings.taskset, **options)
    if settings.budget_ms is not None:
        result.update(budget_ms=settings.budget_ms, within_budget=result["median_ms"] <= settings.budget_ms)
    return result


# ---- latency table --------------------------------------------------------------------------
def latency_table(model: nn.Module, space: ChannelSpace, settings: LutSettings, output: str | Path,
                  progress: bool = True) -> dict:
    """Time every layer of `space` on a width grid on this machine's runtime and fit the table
    to whole models; with `settings.check`, report its accuracy on random configs."""
    record = build_table(model, space, backend=settings.backend, threads=settings.threads, grid=settings.grid,
                         anchors=settings.anchors, runs=settings.runs, warmup=settings.warmup, progress=progress)
    if settings.check:
        record["check"] = check_table(model, space, record, configs=settings.check, runs=settings.runs,
                                      warmup=settings.warmup, progress=progress)
    atomic_write_json(output, record)
    return record


def lut_model_space(target: nn.Module | str | Path, divisor: int = 8, min_width: float = 0.25
                    ) -> tuple[nn.Module, ChannelSpace]:
    """The model and channel space a latency table is for: a supernet run folder's, or an
    unpruned model's own."""
    if isinstance(target, (str, Path)):
        supernet, _ = load_supernet(supernet_file(target))
        return supernet.plain_copy().eval(), supernet.space
    model = target.eval()
    card = card_of(model)
    if card.pruned:
        raise CompressError(f"'{card.source}' is pruned; build the table for the unpruned model or its supernet.")
    return model, ChannelSpace.from_model(model, example_input(card.input_size, model), divisor=divisor,
                                          min_ratio=min_width)


def _digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
