"""One training loop for training from scratch, fine-tuning, distillation and supernets.

Modelled on torchvision's references/classification/train.py: plain PyTorch, DDP under
torchrun, AMP, EMA, an atomic checkpoint every epoch and exact resume. Supernet trainers
pass their own `step` (what one batch computes); everything else is shared.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from compress.training import distributed
from compress.models.card import ModelCard, card_of
from compress.data.specs import check_task, collate_of, eval_set, random_subset, train_holdout
from compress.errors import CompressError
from compress.training.evaluate import evaluate, to_device
from compress.files import atomic_save, atomic_write_json, atomic_write_text, safe_torch_load
from compress.training.qat import QuantizationAware, quantization_aware
from compress.settings import DataSettings, TrainSettings
from compress.training.tasks import Classify, UserLoss, task_of

STATE_FILE = "last.pt"
BEST_FILE = "best.pt"  # keep_best: the best state so far, with its held-out scores
BEST_INT8_FILE = "best_int8.pt"  # keep_best in the quantization-aware epochs (a state of another shape)
RANGE_BATCHES = 8  # training batches that set the int8 activation ranges before the quantization-aware epochs
KEPT_FILE = "keep_best.json"  # keep_best: the step and held-out scores of the state fit returned
# keep_best holds out `holdout` training images, but never more than this share of a small set
KEEP_BEST_SHARE = 0.1


class Loaders(NamedTuple):
    """A user's own data: a training loader and, optionally, one to validate each epoch on and
    one of held-out training images to keep the best state by (`keep_best`)."""

    train: DataLoader
    val: DataLoader | None = None
    holdout: DataLoader | None = None


Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, Callable[[torch.Tensor], None]], torch.Tensor]


def standard_step(cfg: TrainSettings, teacher: nn.Module | None = None, task: Classify | None = None) -> Step:
    """The task's loss (cross-entropy with label smoothing; per pixel for segmentation), plus
    distillation from `teacher`'s outputs when given (KL on softened logits, per pixel)."""
    task = task or Classify(cfg.label_smoothing)

    def step(model, images, labels, backward):
        outputs = model(images)
        loss = task.loss(outputs, labels, images)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(images)
            loss = (1 - cfg.kd_weight) * loss + cfg.kd_weight * task.distill(outputs, target, cfg.kd_temperature)
        backward(loss)
        return loss.detach()
    return step


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BN/bias (1-D) and depthwise weights, as slimmable_networks does."""
    decay, no_decay = [], []
    for module in model.modules():
        depthwise = isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or depthwise else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainSettings, steps_per_epoch: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return factor


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def spec_loaders(data: DataSettings, card: ModelCard, cfg: TrainSettings, validate: bool = True
                 ) -> tuple[Loaders, np.ndarray]:
    """Loaders for a data spec, split across torchrun ranks, and the indices of the
    `cfg.holdout` training images held out (for the search)."""
    world, rank = distributed.world_size(), distributed.rank()
    if data.batch_size % world:
        raise CompressError(f"batch size {data.batch_size} does not split over {world} processes; "
                            f"use a multiple of {world}.")
    check_task(data.spec, card.task)
    train_set, held_set, held = train_holdout(data.spec, card.input_size, card.mean, card.std, card.num_classes,
                                              cfg.holdout, cfg.seed, KEEP_BEST_SHARE if cfg.keep_best else 1.0)
    per_rank = data.batch_size // world
    if len(train_set) < data.batch_size:
        raise CompressError(f"data {data.spec} has {len(train_set)} training images, fewer than one batch "
                            f"({data.batch_size}); lower `batch_size`.")
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    train = DataLoader(train_set, per_rank, sampler=sampler, num_workers=data.workers, drop_last=True,
                       pin_memory=torch.cuda.is_available(), persistent_workers=data.workers > 0,
                       collate_fn=collate_of(train_set))
    val = None
    if validate:
        ds = random_subset(eval_set(data.spec, card.input_size, card.mean, card.std, card.num_classes),
                           cfg.val_images, cfg.seed)
        val_sampler = DistributedSampler(ds, world, rank, shuffle=False) if world > 1 else None
        val = DataLoader(ds, per_rank, sampler=val_sampler, num_workers=data.workers, collate_fn=collate_of(ds))
    holdout = None
    if held_set is not None and cfg.keep_best:
        held_sampler = DistributedSampler(held_set, world, rank, shuffle=False) if world > 1 else None
        holdout = DataLoader(held_set, per_rank, sampler=held_sampler, num_workers=data.workers,
                             collate_fn=collate_of(held_set))
    return Loaders(train, val, holdout), held


def fit(model: nn.Module, data: DataSettings | Loaders | DataLoader | str, cfg: TrainSettings, run_dir: str | Path,
        teacher: nn.Module | None = None, step: Step | None = None, resume: bool = False, validate: bool = True,
        quiet: bool = False, loss: Callable | None = None) -> nn.Module:
    """Train `model` (carrying a card) on `data`: a data spec (DataSettings, or its spec string)
    or a user's own `Loaders(train, val)`. Returns the trained module (the EMA weights when
    EMA is on). `run_dir` receives last.pt every epoch and metrics.jsonl; `resume=True`
    continues from run_dir/last.pt exactly. The loss is the model's task's (compress.training.tasks),
    or `loss(outputs, targets)` when given, plus distillation from `teacher`."""
    if cfg.epochs < 1:
        raise CompressError(f"training needs `epochs` >= 1, got {cfg.epochs}.")
    run_dir = Path(run_dir)
    rank, world, device = distributed.init()
    main = rank == 0
    if cfg.amp != "none" and device.type != "cuda":
        raise CompressError(f"`amp` {cfg.amp} needs a CUDA device; this run is on {device}. Use amp none.")
    card = card_of(model)
    task = task_of(model, cfg.label_smoothing)
    if loss is not None:
        task = UserLoss(task, loss)
    if cfg.qat_epochs and task.name != "classify":
        raise CompressError(f"quantization-aware recovery (`qat_epochs`) trains a classifier towards its int8 file; "
                            f"this is a {task.name} model, whose int8 export is not built: set `qat_epochs: 0`.")
    state_path = run_dir / STATE_FILE
    saved = safe_torch_load(state_path) if resume else None
    data = DataSettings(spec=data) if isinstance(data, str) else data
    recorded = {"settings": cfg.model_dump(), "data": data.model_dump() if isinstance(data, DataSettings) else None}
    if resume:
        _check_same_config(saved, recorded, state_path)
    _seed(cfg.seed + rank, cfg.deterministic)

    if isinstance(data, DataSettings):
        (loader, val_loader, select_loader), held = spec_loaders(data, card, cfg, validate)
    else:
        (loader, val_loader, select_loader), held = (Loaders(data) if isinstance(data, DataLoader) else data), None
        val_loader = val_loader if validate else None
    if cfg.keep_best and select_loader is None:
        raise CompressError("`keep_best` keeps the best state by held-out training images: set `holdout` > 0 (a "
                            "data spec), or pass Loaders(train, val, holdout) with a loader of images kept out of "
                            "training; or turn `keep_best` off.")
    sampler = getattr(loader, "sampler", None)
    steps = len(loader) if cfg.steps_per_epoch <= 0 else min(cfg.steps_per_epoch, len(loader))

    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device).eval()  # run under no_grad by the step; its own flags stay the caller's
    # Fused kernels update every parameter in one pass; on CPU the default per-tensor loop is
    # several times slower on a PruningNet's hypernetworks (bench_supernet_speed.py measures it).
    fused = device.type in ("cpu", "cuda")
    opt = (torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                           fused=fused)
           if cfg.optimizer == "sgd" else torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                                             fused=fused))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) \
        if cfg.ema_decay else None
    step = step or standard_step(cfg, teacher, task)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)
                if cfg.amp != "none" else contextlib.nullcontext())

    history, start = [], 0
    qat_from = cfg.epochs - cfg.qat_epochs if cfg.qat_epochs else None
    trained: nn.Module = model  # what the epochs train: the model, or from qat_from on its int8 form
    if saved is not None:
        if qat_from is not None and saved["epoch"] + 1 > qat_from:
            trained = _int8_form(model, card, device)
        trained.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        history, start = saved["history"], saved["epoch"] + 1
        if world == 1:  # other ranks' generators were not saved; they reseed per rank
            _set_rng_state(saved["rng"])
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "train_config.json", recorded)
        if held is not None:
            atomic_write_json(run_dir / "holdout.json", {"data": data.spec, "seed": cfg.seed, "indices": held.tolist()},
                              indent=None)
        _write_metrics(run_dir, history)
    net = DistributedDataParallel(trained) if world > 1 else trained
    final = ema.module if ema is not None else trained
    best = None
    if cfg.keep_best:
        best = Best(run_dir / (BEST_FILE if trained is model else BEST_INT8_FILE), select_loader, device, main, task)
        best.start(final, resumed=saved is not None)

    def backward(loss: torch.Tensor) -> None:
        scaler.scale(loss).backward()

    for epoch in range(start, cfg.epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if epoch == qat_from and trained is model:
            if best is not None:
                best.restore(model)  # the int8 epochs start from the best float state
            trained = final = _int8_form(model, card, device)
            trained.measure_ranges(images.to(device) for images, _ in itertools.islice(loader, RANGE_BATCHES))
            net = DistributedDataParallel(trained) if world > 1 else trained
            if best is not None:  # from here the int8 net is what is scored and kept
                best = Best(run_dir / BEST_INT8_FILE, select_loader, device, main, task)
                best.start(final, resumed=False, step=epoch * steps)
        net.train()
        loss_sum, seen = 0.0, 0
        began = time.perf_counter()
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   disable=not main or quiet or not _tty())
        for i, (images, labels) in enumerate(loader):
            if i >= steps:
                break
            images = images.to(device, non_blocking=True)
            labels = to_device(labels, device)
            if cfg.channels_last:
                images = images.to(memory_format=torch.channels_last)
            with autocast:
                loss = step(net, images, labels, backward)
            value = loss.item()  # the one host sync per step
            if distributed.any_true(not math.isfinite(value), device):
                raise CompressError(
                    f"training diverged: loss is {value} at epoch {epoch + 1}, step {i + 1} "
                    f"(global step {epoch * steps + i + 1}). Last good checkpoint: "
                    + (f"{state_path} (after epoch {len(history)})" if history else "none yet")
                    + ". Lower `lr`, or set `clip_grad` or `warmup_epochs`.")
            if cfg.clip_grad > 0:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            if best is not None and cfg.eval_every and (i + 1) % cfg.eval_every == 0 and i + 1 < steps:
                best.check(final, epoch * steps + i + 1)
                net.train()
            loss_sum, seen = loss_sum + value * len(labels), seen + len(labels)
            if not bar.disable:
                bar.update()
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{sched.get_last_lr()[0]:.4f}",
                                img_s=f"{seen * world / (time.perf_counter() - began):.0f}")
        bar.close()
        seconds = time.perf_counter() - began
        sums = distributed.all_sum(torch.tensor([loss_sum, seen], dtype=torch.float64, device=device))
        record = {"epoch": epoch + 1, "train_loss": sums[0].item() / max(sums[1].item(), 1),
                  "lr": sched.get_last_lr()[0], "seconds": round(seconds, 3),
                  "images_per_s": round(sums[1].item() / seconds, 1)}
        if best is not None:
            record.update(best.check(final, (epoch + 1) * steps))
        if val_loader is not None:
            record.update({f"val_{k}": v for k, v in evaluate(final, val_loader, device, task=task).items()})
        history.append(record)
        if main:
            atomic_save({"epoch": epoch, "model": trained.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                         "ema": ema.state_dict() if ema is not None else None, "rng": _rng_state(),
                         "history": history, "train_config": recorded, "card": card.to_dict()}, state_path)
            _write_metrics(run_dir, history)
            _tensorboard(run_dir, record)
            if not quiet:
                print(_summary(record), flush=True)
        distributed.barrier()
    if best is not None:
        chosen = best.restore(final)
        if main:
            atomic_write_json(run_dir / KEPT_FILE, {**chosen, "int8": trained is not model})
    if trained is not model:  # the int8 epochs ran: the plain model, its weights on the grid
        final = trained.release()
    final.card = card
    return final


def _int8_form(model: nn.Module, card: ModelCard, device: torch.device) -> QuantizationAware:
    """`model` as its int8 export computes, for the quantization-aware epochs."""
    example = torch.zeros(1, 3, card.input_size, card.input_size, device=device)
    return quantization_aware(model, example)


def kept_best(run_dir: Path) -> dict | None:
    """What keep_best chose in a finished run folder (step, held-out scores, the start's), or
    None when it was off."""
    path = Path(run_dir) / KEPT_FILE
    return json.loads(path.read_text()) if path.exists() else None


class Best:
    """keep_best: the best state so far by the task's metric on held-out training images (top-1,
    mIoU; then by loss), the starting state included, so training never returns worse than it
    began; kept in BEST_FILE so that a resumed run knows it. Records name the metric "top1"
    whatever the task (the key keep_best.json and the reports read).

    A classifier's later state replaces the best only when, on the same held-out images, it
    gets more of them right than the best by more than one standard error of that paired
    difference (the square root of the images on which the two disagree): a few images'
    gain is noise on a held-out set of hundreds, and taking it trades a known state for one
    as likely to be worse on new images (a pruned net fine-tuned for minutes, whose held-out
    top-1 moves by an image or two, is the case)."""

    def __init__(self, path: Path, loader: DataLoader, device: torch.device, main: bool, task: Classify):
        self.path, self.loader, self.device, self.main, self.task = path, loader, device, main, task
        self.state: dict | None = None
        self.record: dict = {}  # step and scores of the best state, and of the starting one
        self.correct: torch.Tensor | None = None  # the best state's per-image hits on this rank's share

    def start(self, model: nn.Module, resumed: bool, step: int = 0) -> None:
        if resumed and self.path.exists():
            saved = safe_torch_load(self.path)
            self.state, self.record = saved["state"], saved["record"]
            kept = copy.deepcopy(model)
            kept.load_state_dict(self.state)
            self.correct = self._score(kept)[1]
            return
        scores, self.correct = self._score(model)
        self.record = {"step": step, **scores, "start": {"step": step, **scores}}
        self._keep(model)

    def check(self, model: nn.Module, step: int) -> dict:
        """Score the current state; keep it when it beats the best. Returns what the epoch's
        metrics record."""
        scores, correct = self._score(model)
        if self._beats_best(scores, correct):
            self.record.update(step=step, **scores)
            self.correct = correct
            self._keep(model)
        return {"holdout_top1": scores["top1"], "best_holdout_top1": self.record["top1"],
                "best_step": self.record["step"]}

    def _beats_best(self, scores: dict, correct: torch.Tensor | None) -> bool:
        if correct is None or self.correct is None:  # mIoU, mAP: no per-image hit to pair
            return (scores["top1"], -scores["loss"]) > (self.record["top1"], -self.record["loss"])
        gained = (correct & ~self.correct).sum()
        lost = (~correct & self.correct).sum()
        gained, lost = distributed.all_sum(torch.stack([gained, lost]).double()).tolist()
        return gained - lost > math.sqrt(gained + lost)

    def restore(self, model: nn.Module) -> dict:
        model.load_state_dict(self.state)
        return self.record

    def _score(self, model: nn.Module) -> tuple[dict, torch.Tensor | None]:
        result = evaluate(model, self.loader, self.device, task=self.task, per_image=True)
        return {"top1": result[self.task.score], "loss": result["loss"], "metric": self.task.score}, \
            result.get("correct")

    def _keep(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.main:
            atomic_save({"state": self.state, "record": self.record}, self.path)


def _check_same_config(saved: dict, recorded: dict, path: Path) -> None:
    before = saved.get("train_config", {})
    diff = []
    for part in ("settings", "data"):
        old, new = before.get(part) or {}, recorded[part] or {}
        diff += [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
                 if old[k] != new.get(k)]
    if diff:
        raise CompressError(f"cannot resume {path}: the training settings changed ({'; '.join(diff)}). "
                            "Resume with the run's own settings, or start a new run folder.")


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the checkpoint's history, so that a resumed run neither
    loses nor repeats an epoch."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _summary(record: dict) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record['train_loss']:.4f}"]
    if "val_top1" in record:
        parts.append(f"val top-1 {record['val_top1']:.2%}")
    if "val_miou" in record:
        parts.append(f"val mIoU {record['val_miou']:.2%}")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return ", ".join(parts)


def _tty() -> bool:
    import sys
    return sys.stderr.isatty()


def _tensorboard(run_dir: Path, record: dict) -> None:
    """Append one epoch's scalars to TensorBoard logs, when tensorboard is installed. The
    writer is opened per epoch, not kept: its background thread, alive during training,
    slowed training steps by 15-30% on a 2-core machine (benchmarks/bench_train_overhead.py)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch":
                writer.add_scalar(key, value, record["epoch"])
