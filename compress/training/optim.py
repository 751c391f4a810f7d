"""What a training step updates besides the forward pass: the optimizer (no weight decay on
BN, biases and depthwise weights), the warm-up + decay schedule, the fp16 loss scaler and the
EMA of the weights, kept together so that one state dict resumes them all."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from compress.settings import TrainSettings


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


class Optimization:
    """Optimizer, schedule, loss scaler and EMA of `model` for `cfg`, `steps` per epoch."""

    def __init__(self, model: nn.Module, cfg: TrainSettings, steps: int, device: torch.device):
        self.model, self.cfg = model, cfg
        # Fused kernels update every parameter in one pass; on CPU the default per-tensor loop is
        # several times slower on a PruningNet's hypernetworks (bench_supernet_speed.py measures it).
        fused = device.type in ("cpu", "cuda")
        groups = param_groups(model, cfg.weight_decay)
        self.opt = (torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, fused=fused)
                    if cfg.optimizer == "sgd" else torch.optim.AdamW(groups, lr=cfg.lr, fused=fused))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg, steps))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
                    if cfg.ema_decay else None)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        """After the backward pass: clip, step, schedule, average."""
        if self.cfg.clip_grad > 0:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, saved: dict) -> None:
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
