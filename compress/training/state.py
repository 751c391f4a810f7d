"""What makes a resumed run equal to an uninterrupted one: the RNG states, the seeding, the
check that a run is resumed with its own settings, and the per-epoch records (metrics.jsonl,
TensorBoard, the terminal line)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from compress.errors import CompressError
from compress.files import atomic_write_text


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def check_same_config(saved: dict, recorded: dict, path: Path) -> None:
    """A run resumes with the settings and data it started with, or not at all."""
    before = saved.get("train_config", {})
    diff = []
    for part in ("settings", "data"):
        old, new = before.get(part) or {}, recorded[part] or {}
        diff += [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
                 if old[k] != new.get(k)]
    if diff:
        raise CompressError(f"cannot resume {path}: the training settings changed ({'; '.join(diff)}). "
                            "Resume with the run's own settings, or start a new run folder.")


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the checkpoint's history, so that a resumed run neither
    loses nor repeats an epoch."""
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def summary(record: dict) -> str:
    """One epoch's line on the terminal."""
    parts = [f"epoch {record['epoch']}", f"loss {record['train_loss']:.4f}"]
    if "val_top1" in record:
        parts.append(f"val top-1 {record['val_top1']:.2%}")
    if "val_miou" in record:
        parts.append(f"val mIoU {record['val_miou']:.2%}")
    parts.append(f"{record['images_per_s']:.0f} img/s")
    return ", ".join(parts)


def tensorboard(run_dir: Path, record: dict) -> None:
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
