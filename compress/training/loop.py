"""One training loop for training from scratch, fine-tuning, distillation and supernets.

Modelled on torchvision's references/classification/train.py: plain PyTorch, DDP under
torchrun, AMP, EMA, an atomic checkpoint every epoch and exact resume. Supernet trainers
pass their own `step` (what one batch computes); everything else is shared. `fit` reads top
to bottom; what it calls (the loaders, the optimizer state, keep_best, the quantization-aware
switch, the records of a resumable run) are small helpers, each in its own module.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from compress.data.source import DataSource, Loaders, to_device
from compress.errors import CompressError
from compress.files import atomic_save, atomic_write_json, safe_torch_load
from compress.models.card import ModelCard, card_of
from compress.settings import DataSettings, TrainSettings
from compress.training import distributed, keep_best, lr_trial
from compress.training.blockwise import reconstruct_before_training
from compress.training.evaluate import evaluate
from compress.training.features import FeatureMatch
from compress.training.keep_best import BEST_FILE, BEST_INT8_FILE, KEPT_FILE, Best
from compress.training.loaders import loaders_for
from compress.training.optim import Optimization
from compress.training.qat import QuantizationAware, quantization_aware
from compress.training.state import (check_same_config, rng_state, seed_everything, set_rng_state, summary,
                                     tensorboard, write_metrics)
from compress.training.tasks import Classify, UserLoss, task_of
from compress.units import duration

STATE_FILE = "last.pt"
BLOCKS_FILE = "blocks.json"  # each block's held-out error before and after the block-wise reconstruction
ESTIMATE_STEPS = (3, 13)  # a run says how long it will take from the pace between these steps (the first are slow)
RANGE_BATCHES = 8  # training batches that set the int8 activation ranges before the quantization-aware epochs

Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], None]], torch.Tensor]


def standard_step(cfg: TrainSettings, teacher: nn.Module | None = None, task: Classify | None = None,
                  features: FeatureMatch | None = None) -> Step:
    """The task's loss (cross-entropy with label smoothing; per pixel for segmentation), plus
    distillation from `teacher`'s outputs when given (KL on softened logits, per pixel), plus
    the layer-wise feature loss of `features` (after both forward passes) when given."""
    task = task or Classify(cfg.label_smoothing)

    def step(model, images, labels, backward):
        outputs = model(images)
        loss = task.loss(outputs, labels, images)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(images)
            loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * task.distill(outputs, target, cfg.kd_temperature)
            if features is not None:
                loss = loss + cfg.feature_weight * features.loss()
        backward(loss)
        return loss.detach()
    return step


def fit(model: nn.Module, data: DataSource | DataSettings | Loaders | DataLoader | str, cfg: TrainSettings,
        run_dir: str | Path, teacher: nn.Module | None = None, step: Step | None = None, resume: bool = False,
        validate: bool = True, quiet: bool = False, loss: Callable | None = None) -> nn.Module:
    """Train `model` (carrying a card) on `data` (a data source: a spec, DataSettings, or the
    user's own Loaders / DataLoader). Returns the trained module (the EMA weights when EMA is
    on). `run_dir` receives last.pt every epoch and metrics.jsonl; `resume=True` continues
    from run_dir/last.pt exactly. The loss is the model's task's (compress.training.tasks), or
    `loss(outputs, targets)` when given, plus distillation from `teacher`."""
    run_dir = Path(run_dir)
    rank, world, device = distributed.init()
    main = rank == 0
    task = _task(model, cfg, device, loss)
    card, source = card_of(model), DataSource.of(data)
    state_path = run_dir / STATE_FILE
    saved = safe_torch_load(state_path) if resume else None
    recorded = {"settings": cfg.model_dump(), "data": source.settings.model_dump() if source.settings else None}
    if resume:
        check_same_config(saved, recorded, state_path)
    seed_everything(cfg.seed + rank, cfg.deterministic)
    (loader, val_loader, select_loader), held = loaders_for(source, card, cfg, validate)
    steps = len(loader) if cfg.steps_per_epoch <= 0 else min(cfg.steps_per_epoch, len(loader))
    _to_device(model, teacher, cfg, device)
    if saved is None and teacher is not None and step is None and cfg.block_steps:
        if main:  # on rank 0's images; every rank then takes its weights
            records = reconstruct_before_training(model, teacher, loader, cfg, device, quiet)
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / BLOCKS_FILE, records)
        distributed.broadcast_state(model)
    features = _features(model, teacher, cfg, loader, device) if step is None else None
    step = step or standard_step(cfg, teacher, task, features)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)
                if cfg.amp != "none" else contextlib.nullcontext())
    if cfg.lr is None:  # a fine-tune without an lr: the trial's, or lr_base scaled to the batch
        run = lambda net, data, n, opt: train_epoch(net, data, n, step, opt, autocast, cfg, 0, device, True,  # noqa: E731
                                                    None, net, "none yet")
        cfg = cfg.model_copy(update={"lr": lr_trial.resolve(model, cfg, loader.batch_size * world,
                                                            cfg.epochs * steps, loader, select_loader, run_dir,
                                                            main, run, device, quiet)})
    optim = Optimization(model, cfg, steps, device)
    qat_from = cfg.epochs - cfg.qat_epochs if cfg.qat_epochs else None
    # what the epochs train: the model, or from qat_from on its int8 form
    trained, history, start = _resumed(saved, model, card, device, optim, qat_from, world)
    if main:
        _start_records(run_dir, recorded, source, cfg, held, history)
    final = optim.ema.module if optim.ema is not None else trained
    best = None
    if cfg.keep_best:
        best = Best(run_dir / (BEST_FILE if trained is model else BEST_INT8_FILE), select_loader, device, main, task,
                    teacher)
        best.start(final, resumed=saved is not None)
    net = DistributedDataParallel(trained) if world > 1 else trained
    for epoch in range(start, cfg.epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if epoch == qat_from and trained is model:
            trained = final = _enter_int8(model, card, device, loader, best)
            net = DistributedDataParallel(trained) if world > 1 else trained
            if best is not None:  # from here the int8 net is what is scored and kept
                best = Best(run_dir / BEST_INT8_FILE, select_loader, device, main, task, teacher)
                best.start(final, resumed=False, step=epoch * steps)
        last_good = f"{state_path} (after epoch {len(history)})" if history else "none yet"
        record = train_epoch(net, loader, steps, step, optim, autocast, cfg, epoch, device, quiet or not main,
                             best, final, last_good, left=(cfg.epochs - epoch) * steps if epoch == start else 0)
        if best is not None:
            record.update(best.check(final, (epoch + 1) * steps))
        if val_loader is not None:
            record.update({f"val_{k}": v for k, v in evaluate(final, val_loader, device, task=task).items()})
        history.append(record)
        if main:
            atomic_save({"epoch": epoch, "model": trained.state_dict(), **optim.state_dict(), "rng": rng_state(),
                         "history": history, "train_config": recorded, "card": card.to_dict()}, state_path)
            _epoch_records(run_dir, history, quiet)
        distributed.barrier()
    return _finish(final, trained, trained is not model, card, best, features, run_dir, main, quiet)


def train_epoch(net: nn.Module, loader: DataLoader, steps: int, step: Step, optim: Optimization, autocast,
                cfg: TrainSettings, epoch: int, device: torch.device, quiet: bool, best: Best | None,
                final: nn.Module, last_good: str, left: int = 0) -> dict:
    """One epoch of `steps` steps; keep_best checks `final` every `cfg.eval_every` steps.
    With `left` (the steps left in the run, this epoch's included), says after a few steps how
    long the run will take here. Returns the epoch's record (loss summed over ranks, lr, time,
    throughput)."""
    net.train()
    world = distributed.world_size()
    loss_sum, seen = 0.0, 0
    began = time.perf_counter()
    paced = began  # when the estimate's timed steps began
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
               disable=quiet or not _tty())
    for i, (images, labels) in enumerate(loader):
        if i >= steps:
            break
        images = images.to(device, non_blocking=True)
        labels = to_device(labels, device)
        if cfg.channels_last:
            images = images.to(memory_format=torch.channels_last)
        with autocast:
            loss = step(net, images, labels, optim.backward)
        value = loss.item()  # the one host sync per step
        if distributed.any_true(not math.isfinite(value), device):
            raise CompressError(
                f"training diverged: loss is {value} at epoch {epoch + 1}, step {i + 1} (global step "
                f"{epoch * steps + i + 1}). Last good checkpoint: {last_good}. Lower `lr`, or set `clip_grad` or "
                "`warmup_epochs`.")
        optim.step()
        if best is not None and cfg.eval_every and (i + 1) % cfg.eval_every == 0 and i + 1 < steps:
            best.check(final, epoch * steps + i + 1)
            net.train()
        loss_sum, seen = loss_sum + value * len(labels), seen + len(labels)
        if left and not quiet:
            paced = _pace(paced, i + 1, steps, left, cfg)
        if not bar.disable:
            bar.update()
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{optim.lr():.4f}",
                            img_s=f"{seen * world / (time.perf_counter() - began):.0f}")
    bar.close()
    seconds = time.perf_counter() - began
    sums = distributed.all_sum(torch.tensor([loss_sum, seen], dtype=torch.float64, device=device))
    return {"epoch": epoch + 1, "train_loss": sums[0].item() / max(sums[1].item(), 1), "lr": optim.lr(),
            "seconds": round(seconds, 3), "images_per_s": round(sums[1].item() / seconds, 1)}


def _pace(paced: float, done: int, steps: int, left: int, cfg: TrainSettings) -> float:
    """Time the steps between ESTIMATE_STEPS (all of them in a shorter epoch) and then say once
    how long the run will take at that pace (evaluation aside). Returns when the timing began."""
    first, last = (0, steps) if steps <= ESTIMATE_STEPS[1] else ESTIMATE_STEPS
    if done == first:
        return time.perf_counter()
    if done == last:
        each = (time.perf_counter() - paced) / (last - first)
        later = " (quantization-aware steps run slower)" if cfg.qat_epochs and cfg.qat_epochs < cfg.epochs else ""
        tqdm.write(f"{left} steps at {each:.2f} s each here: about {duration(each * left)} for the run, "
                   f"besides evaluation{later}")
    return paced


def _resumed(saved: dict | None, model: nn.Module, card: ModelCard, device: torch.device, optim: Optimization,
             qat_from: int | None, world: int) -> tuple[nn.Module, list[dict], int]:
    """(what the epochs train, the history so far, the first epoch to run): a resumed run's
    state as it was saved (its int8 form when it stopped in the quantization-aware epochs)."""
    if saved is None:
        return model, [], 0
    trained = _int8_form(model, card, device) if qat_from is not None and saved["epoch"] + 1 > qat_from else model
    trained.load_state_dict(saved["model"])
    optim.load_state_dict(saved)
    if world == 1:  # other ranks' generators were not saved; they reseed per rank
        set_rng_state(saved["rng"])
    return trained, saved["history"], saved["epoch"] + 1


def _finish(final: nn.Module, trained: nn.Module, int8: bool, card: ModelCard, best: Best | None,
            features: FeatureMatch | None, run_dir: Path, main: bool, quiet: bool) -> nn.Module:
    """The model fit returns: keep-best's state (and the terminal line saying which), the plain
    model with its weights on the int8 grid when the quantization-aware epochs ran, its card."""
    if features is not None:
        features.remove()
    if best is not None:
        chosen = best.restore(final)
        if main:
            atomic_write_json(run_dir / KEPT_FILE, {**chosen, "int8": int8})
            if not quiet:
                print(keep_best.summary(chosen, len(best.loader.dataset)), flush=True)
    if int8:
        final = trained.release()
    final.card = card
    return final


def _features(model: nn.Module, teacher: nn.Module | None, cfg: TrainSettings, loader: DataLoader,
              device: torch.device) -> FeatureMatch | None:
    """Layer-wise feature distillation, when asked for and there is a teacher: each layer's kept
    channels matched on the first training batch."""
    if teacher is None or not cfg.feature_weight:
        return None
    images = next(iter(loader))[0].to(device)
    return FeatureMatch(model, teacher, images.to(memory_format=torch.channels_last) if cfg.channels_last else images)


def _to_device(model: nn.Module, teacher: nn.Module | None, cfg: TrainSettings, device: torch.device) -> None:
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device).eval()  # run under no_grad by the step; its own flags stay the caller's


def _task(model: nn.Module, cfg: TrainSettings, device: torch.device, loss: Callable | None) -> Classify | UserLoss:
    """The model's task (its loss and metric), or the user's loss around it; settings this run
    cannot honour are refused before any work."""
    if cfg.epochs < 1:
        raise CompressError(f"training needs `epochs` >= 1, got {cfg.epochs}.")
    if cfg.amp != "none" and device.type != "cuda":
        raise CompressError(f"`amp` {cfg.amp} needs a CUDA device; this run is on {device}. Use amp none.")
    task = task_of(model, cfg.label_smoothing)
    return UserLoss(task, loss) if loss is not None else task


def _int8_form(model: nn.Module, card: ModelCard, device: torch.device) -> QuantizationAware:
    """`model` as its int8 export computes, for the quantization-aware epochs."""
    example = torch.zeros(1, 3, card.input_size, card.input_size, device=device)
    return quantization_aware(model, example)


def _enter_int8(model: nn.Module, card: ModelCard, device: torch.device, loader: DataLoader,
                best: Best | None) -> QuantizationAware:
    """The switch to the quantization-aware epochs: from the best float state, with activation
    ranges measured on the first training batches."""
    if best is not None:
        best.restore(model)
    trained = _int8_form(model, card, device)
    trained.measure_ranges(images.to(device) for images, _ in itertools.islice(loader, RANGE_BATCHES))
    return trained


def _start_records(run_dir: Path, recorded: dict, source: DataSource, cfg: TrainSettings, held, history) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "train_config.json", recorded)
    if held is not None:
        atomic_write_json(run_dir / "holdout.json", {"data": source.spec, "seed": cfg.seed, "indices": held.tolist()},
                          indent=None)
    write_metrics(run_dir, history)


def _epoch_records(run_dir: Path, history: list[dict], quiet: bool) -> None:
    write_metrics(run_dir, history)
    tensorboard(run_dir, history[-1])
    if not quiet:
        print(summary(history[-1]), flush=True)


def _tty() -> bool:
    import sys
    return sys.stderr.isatty()
