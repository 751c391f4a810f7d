"""The fine-tune's learning rate when none is given: `lr_base` per 256 images, scaled to the
batch size (as timm's `lr_base`), and, with held-out images, chosen by a short trial around it:
each candidate trains a copy of the model, its lr annealed to zero over the trial's steps, and
is scored by its held-out loss. The walk starts at the scaled lr and its 4x; it goes on by 4x
the way the better of those lies for as long as the newest lr has the lowest loss. Of the lrs
tried, those within 1% of the lowest loss tie: the smaller wins in a short run, the larger in a
long one. A long run (at least 8 tries long) then has a final: the walk's lr against twice it,
each over a quarter of the run, the larger winning a tie.

Why this shape: a pretrained, pruned net is close to a sharp edge (a from-scratch lr wrecks in a
few steps what pruning kept, and keep-best can only refuse the damage), yet with thousands of
images a training lr is what passes a teacher short of training. A trial at a constant lr sees
only a large lr's noise, never what it gains once annealed, and a short one favours the gentlest
lr whatever the run (short-horizon bias, Wu et al., ICLR 2018): on 5,000 images
(benchmarks/RESULTS.md, "Recovery with few images") 20 constant-lr steps chose 0.00025 for a
420-step run that ends 2.6 points higher at 0.01, and tries annealed over an eighth of it chose
0.004, 1.3 points under 0.01. So each candidate is annealed and trains for an eighth of the run
(at least `lr_trial` steps, at most the run); and since the bias only ever favours the smaller
lr, a long run's final asks, over a horizon twice as long, whether the walk's lr is too small
by half a step of it."""
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
STEP = 4.0  # between candidates
MAX_TRIES = 4
SHARE = 8  # a candidate trains for 1/SHARE of the run's steps (at least `lr_trial`)
FINAL = 2  # a long run's final: the walk's lr and FINAL times it, each over FINAL times a try's steps


def scaled_lr(cfg: FinetuneSettings, batch_size: int) -> float:
    """`lr_base` (per 256 images) at this global batch size."""
    return cfg.lr_base * batch_size / 256


def trial_steps(cfg: FinetuneSettings, total: int) -> int:
    """Steps per candidate for a run of `total` steps."""
    return min(total, max(cfg.lr_trial, total // SHARE))


def _repeated(loader: DataLoader):
    """The loader's batches, epoch after epoch (a trial may be longer than a small set's epoch)."""
    while True:
        yield from loader


def trial(model: nn.Module, lrs: list[float], steps: int, loader: DataLoader, held: DataLoader, cfg: TrainSettings,
          run_steps, device: torch.device) -> list[dict]:
    """Train a copy of `model` for `steps` steps at each lr of `lrs`, annealed to zero over them
    (`run_steps(net, batches, steps, optim)` runs them; it raises CompressError when the loss
    diverges), and score it on `held`: one record per lr, its held-out loss (inf when it
    diverged). The caller's RNG state is restored, so the run after the trial is the run
    without it."""
    saved = rng_state()
    results = []
    for lr in lrs:
        net = copy.deepcopy(model)
        optim = Optimization(net, cfg.model_copy(update={"lr": lr, "epochs": 1, "warmup_epochs": 0.0,
                                                         "ema_decay": 0.0}), steps, device)
        try:
            run_steps(net, _repeated(loader), steps, optim)
            scores = evaluate(net, held, device)
            loss = scores["loss"] if math.isfinite(scores["loss"]) else math.inf
        except CompressError:  # diverged
            loss, scores = math.inf, {}
        results.append({"lr": lr, "heldout_loss": loss, **{k: v for k, v in scores.items() if k != "loss"}})
        del net, optim
    set_rng_state(saved)
    return results


def chosen(results: list[dict], larger: bool = False) -> float:
    """The lr with the lowest held-out loss; of lrs within 1% of it, the smaller, or the larger
    when `larger` (a run much longer than a try: see `resolve`)."""
    best = min(r["heldout_loss"] for r in results)
    if not math.isfinite(best):
        return min(r["lr"] for r in results)  # every candidate diverged: the gentlest, keep-best guards it
    return (max if larger else min)(r["lr"] for r in results if r["heldout_loss"] <= best * 1.01)


def search(model: nn.Module, base: float, steps: int, loader: DataLoader, held: DataLoader, cfg: TrainSettings,
           run_steps, device: torch.device, larger: bool = False) -> list[dict]:
    """The trial's walk from `base` (see the module's note), ties going to the larger lr when
    `larger`: every candidate tried, in order."""
    args = (steps, loader, held, cfg, run_steps, device)
    results = trial(model, [base, base * STEP], *args)
    direction = STEP if chosen(results, larger) > base else 1 / STEP
    while len(results) < MAX_TRIES:
        edge = (max if direction > 1 else min)(results, key=lambda r: r["lr"])
        if edge["heldout_loss"] > min(r["heldout_loss"] for r in results):  # the best lies inside what was tried
            break
        results += trial(model, [edge["lr"] * direction], *args)
    return results


def _losses(results: list[dict]) -> str:
    return ", ".join(f"{r['lr']:.2g}: {r['heldout_loss']:.3f}" for r in results)


def resolve(model: nn.Module, cfg: FinetuneSettings, batch_size: int, total: int, loader: DataLoader,
            held: DataLoader | None, run_dir: Path, main: bool, run_steps, device: torch.device, quiet: bool) -> float:
    """The fine-tune's lr: `cfg.lr` when set; else the trial's choice (kept in the run folder,
    so a resumed run uses the same) for a run of `total` steps; else, without held-out images
    or with `lr_trial` 0, `lr_base` scaled to the batch."""
    if cfg.lr is not None:
        return cfg.lr
    path = Path(run_dir) / TRIAL_FILE
    if path.exists():
        return json.loads(path.read_text())["lr"]
    base = scaled_lr(cfg, batch_size)
    if not cfg.lr_trial or held is None or not total:
        return base
    steps = trial_steps(cfg, total)
    # A try as short as an eighth of the run favours small lrs: what a larger lr gains shows only
    # over a longer anneal. So when the run is that much longer than a try, a larger lr within the
    # noise of the best is taken, and the final checks half a step above it; when a try is most
    # of the run, the smaller one wins (keep-best guards either).
    larger = total >= SHARE * steps
    if main and not quiet:  # the trial trains quietly: say where the time goes before it does
        then = f", then 2 of {FINAL * steps}" if larger else ""
        print(f"lr trial: 2-{MAX_TRIES} tries of {steps} steps{then} before the run's {total} (giving an lr skips it)",
              flush=True)
    args = (loader, held, cfg, run_steps, device)
    results = search(model, base, steps, *args, larger)
    lr, final = chosen(results, larger), []
    if larger:
        final = trial(model, [lr, lr * FINAL], FINAL * steps, *args)
        lr = chosen(final, larger)
    if main:
        atomic_write_json(path, {"lr": lr, "batch_size": batch_size, "lr_base": cfg.lr_base, "steps": steps,
                                 "ties_to": "larger" if larger else "smaller", "candidates": results,
                                 "final_steps": FINAL * steps if final else 0, "final": final})
        if not quiet:
            print(f"lr trial ({steps} steps each, annealed; held-out loss): {_losses(results)}", flush=True)
            if final:
                print(f"lr final ({FINAL * steps} steps each): {_losses(final)}", flush=True)
            print(f"fine-tuning at lr {lr:.2g}", flush=True)
    return lr
