"""The train / fine-tune stage: one run of the training loop in its own run folder, ending in
a checkpoint that carries the model's card."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from compress.checkpoint import save_checkpoint
from compress.data.source import DataSource
from compress.settings import TrainSettings
from compress.stages.folders import run_folder
from compress.training import distributed
from compress.training.loop import fit


@dataclass
class Trained:
    model: nn.Module
    checkpoint: Path
    history: list[dict] = field(default_factory=list)


def train(model: nn.Module, data, settings: TrainSettings, out: str | Path, output: str | Path | None = None,
          teacher: nn.Module | None = None, resume: bool = False, quiet: bool = False,
          provenance: dict | None = None, record: dict | None = None, loss: Callable | None = None) -> Trained:
    """Train (or fine-tune, with a teacher to distil from) `model` on `data` (a data source: a
    spec, DataSettings or your own Loaders) in run folder `out`; the trained checkpoint goes to
    `output` (default `out/model.pt`). `resume` continues an interrupted run exactly; `loss`
    replaces the task's own loss."""
    out = Path(out)
    output = Path(output) if output else out / "model.pt"
    source = DataSource.of(data)
    with run_folder(out, resume, record):
        trained = fit(model, source, settings, out, teacher=teacher, resume=resume, quiet=quiet, loss=loss)
        if distributed.is_main():
            save_checkpoint(output, trained, provenance={"data": source.name, "epochs": settings.epochs,
                                                         **(provenance or {})})
    distributed.barrier()
    metrics = out / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return Trained(trained, output, history)
