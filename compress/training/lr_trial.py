"""The fine-tune's learning rate when none is given: `lr_base` per 256 images, scaled to the
batch size (as timm's `lr_base`), and, with held-out images, chosen by a short trial of a few
candidates around it: each trains a copy of the model for `lr_trial` steps, and the one with
the lowest held-out loss wins (the smaller on a tie; a candidate that diverges loses). A
pretrained, pruned net is close to a sharp edge: a from-scratch lr wrecks in a few steps what
pruning kept, and keep-best can only refuse the damage, not undo it."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from compress.errors import CompressError
from compress.files import atomic_write_json
from compress.settings import FinetuneSettings, TrainSettings
from compress.training.evaluate import evaluate
from compress.training.optim import Optimization
from compress.training.state import rng_state, set_rng_state

TRIAL_FILE = "lr_trial.json"
FACTORS = (0.25, 1.0, 4.0)  # the candidates, as multiples of the batch-scaled lr_base


def scaled_lr(cfg: FinetuneSettings, batch_size: int) -> float:
    """`lr_base` (per 256 images) at this global batch size."""
    return cfg.lr_base * batch_size / 256


def trial(model: nn.Module, lrs: list[float], steps: int, loader: DataLoader, held: DataLoader, cfg: TrainSettings,
          run_steps, device: torch.device) -> list[dict]:
    """Train a copy of `model` for `steps` steps at each lr of `lrs` (`run_steps(net, loader,
    steps, optim)` runs them; it raises CompressError when the loss diverges) and score it on
    `held`: one record per lr, its held-out loss (inf when it diverged). The caller's RNG state
    is restored, so the run after the trial is the run without it."""
    saved = rng_state()
    results = []
    for lr in lrs:
        net = copy.deepcopy(model)
        optim = Optimization(net, cfg.model_copy(update={"lr": lr, "warmup_epochs": 0.0, "ema_decay": 0.0}),
                             steps, device)
        try:
            run_steps(net, loader, steps, optim)
            scores = evaluate(net, held, device)
            loss = scores["loss"] if math.isfinite(scores["loss"]) else math.inf
        except CompressError:  # diverged
            loss, scores = math.inf, {}
        results.append({"lr": lr, "heldout_loss": loss, **{k: v for k, v in scores.items() if k != "loss"}})
        del net, optim
    set_rng_state(saved)
    return results


def chosen(results: list[dict]) -> float:
    """The lr with the lowest held-out loss; the smaller lr when two are within 1% of each other."""
    best = min(r["heldout_loss"] for r in results)
    if not math.isfinite(best):
        return min(r["lr"] for r in results)  # every candidate diverged: the gentlest, keep-best guards it
    return min(r["lr"] for r in results if r["heldout_loss"] <= best * 1.01)


def resolve(model: nn.Module, cfg: FinetuneSettings, batch_size: int, loader: DataLoader, held: DataLoader | None,
            run_dir: Path, main: bool, run_steps, device: torch.device, quiet: bool) -> float:
    """The fine-tune's lr: `cfg.lr` when set; else the trial's choice (kept in the run folder,
    so a resumed run uses the same); else, without held-out images or with `lr_trial` 0,
    `lr_base` scaled to the batch."""
    if cfg.lr is not None:
        return cfg.lr
    path = Path(run_dir) / TRIAL_FILE
    if path.exists():
        return json.loads(path.read_text())["lr"]
    base = scaled_lr(cfg, batch_size)
    if not cfg.lr_trial or held is None:
        return base
    results = trial(model, [base * f for f in FACTORS], cfg.lr_trial, loader, held, cfg, run_steps, device)
    lr = chosen(results)
    if main:
        atomic_write_json(path, {"lr": lr, "batch_size": batch_size, "lr_base": cfg.lr_base, "steps": cfg.lr_trial,
                                 "candidates": results})
        if not quiet:
            shown = ", ".join(f"{r['lr']:.2g}: {r['heldout_loss']:.3f}" for r in results)
            print(f"lr trial ({cfg.lr_trial} steps each, held-out loss): {shown}; fine-tuning at lr {lr:.2g}",
                  flush=True)
    return lr
