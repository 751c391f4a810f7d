"""keep_best: return the best state a run reached on held-out training images, never one worse
than it started from (`Best`), and what was returned (`kept_best`)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from compress.files import atomic_save, safe_torch_load
from compress.training import distributed
from compress.training.evaluate import evaluate
from compress.training.tasks import Classify
from compress.units import format_score

BEST_FILE = "best.pt"  # the best state so far, with its held-out scores
BEST_INT8_FILE = "best_int8.pt"  # the same in the quantization-aware epochs (a state of another shape)
KEPT_FILE = "keep_best.json"  # the step and held-out scores of the state fit returned
# keep_best holds out `holdout` training images, but never more than this share of a small set
KEEP_BEST_SHARE = 0.1


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
    top-1 moves by an image or two, is the case).

    With a `teacher` (a classifier's fine-tune distilled from the unpruned model), a later state
    also replaces the best when it comes closer to the teacher: its divergence from the teacher's
    predictions (KL, per held-out image) lower by more than one standard error of the paired
    difference, and its hits not fewer by more than one. It needs no labels, and a per-image
    divergence says far more than a hit or a miss: on the 50 images a 500-image set holds out,
    the hits rule alone took states that had gained an image or two by chance and were further
    from the teacher (and worse on the test images) in 2 of 3 seeds (benchmarks/RESULTS.md,
    "Recovery with few images"). A gain in hits beyond twice the noise is taken even away from
    the teacher: a student trained on plenty of labelled images can pass a teacher that is
    itself short of training (the demo's 500-step transfer: 77% -> 81% held-out top-1 while
    moving away from it), and the teacher alone would have handed back the start. So is a
    held-out loss on the labels lower by more than twice the standard error of the paired
    per-image difference, its hits not fewer by more than one: with 5,000 training images the
    hits rule turned down a state 1.6 points higher on 500 held-out images (loss 0.727 -> 0.685)
    that had moved away from the teacher, and handed back a net 2.5 points under the run's last
    state on 5,000 test images (benchmarks/RESULTS.md, "Recovery with few images")."""

    def __init__(self, path: Path, loader: DataLoader, device: torch.device, main: bool, task: Classify,
                 teacher: nn.Module | None = None):
        self.path, self.loader, self.device, self.main, self.task = path, loader, device, main, task
        self.teacher = Remembered(teacher) if teacher is not None and task.name in ("classify", "embed") else None
        self.state: dict | None = None
        self.record: dict = {}  # step and scores of the best state, and of the starting one
        self.correct: torch.Tensor | None = None  # the best state's per-image hits on this rank's share
        self.losses: torch.Tensor | None = None  # their cross-entropy
        self.divergence: torch.Tensor | None = None  # its per-image KL from the teacher, with a teacher

    def start(self, model: nn.Module, resumed: bool, step: int = 0) -> None:
        if resumed and self.path.exists():
            saved = safe_torch_load(self.path)
            self.state, self.record = saved["state"], saved["record"]
            kept = copy.deepcopy(model)
            kept.load_state_dict(self.state)
            _, (self.correct, self.losses, self.divergence) = self._score(kept)
            return
        scores, (self.correct, self.losses, self.divergence) = self._score(model)
        self.record = {"step": step, **scores, "start": {"step": step, **scores}}
        self._keep(model)

    def check(self, model: nn.Module, step: int) -> dict:
        """Score the current state; keep it when it beats the best. Returns what the epoch's
        metrics record."""
        scores, per_image = self._score(model)
        divergence = per_image[-1]
        later = self.record.get("best_later")
        key = (lambda r: -r["divergence"]) if divergence is not None else (lambda r: r["top1"])
        if later is None or key(scores) > key(later):  # what the terminal line reports
            self.record["best_later"] = {"step": step, **scores}
        why = self._beats_best(scores, *per_image)
        if why:
            self.record.update(step=step, taken_for=why, **scores)
            self.correct, self.losses, self.divergence = per_image
            self._keep(model)
        return {"holdout_top1": scores["top1"], "best_holdout_top1": self.record["top1"],
                "best_step": self.record["step"]}

    def _beats_best(self, scores: dict, correct: torch.Tensor | None, losses: torch.Tensor | None,
                    divergence: torch.Tensor | None) -> str | None:
        """Why the state replaces the best ("hits", "labels" or "teacher"), or None when it does not."""
        if correct is None or self.correct is None:  # mIoU, mAP: no per-image hit to pair
            return "hits" if (scores["top1"], -scores["loss"]) > (self.record["top1"], -self.record["loss"]) else None
        gained = (correct & ~self.correct).sum()
        lost = (~correct & self.correct).sum()
        gained, lost = distributed.all_sum(torch.stack([gained, lost]).double()).tolist()
        noise = math.sqrt(gained + lost)
        if gained - lost > (noise if divergence is None or self.divergence is None else 2 * noise):
            return "hits"
        if divergence is None or self.divergence is None or lost - gained > noise:
            return None
        if self._lower(divergence, self.divergence, 1.0):
            return "teacher"
        if losses is not None and self.losses is not None and self._lower(losses, self.losses, 2.0):
            return "labels"
        return None

    def _lower(self, new: torch.Tensor, old: torch.Tensor, errors: float) -> bool:
        """Whether the per-image values `new` are lower than `old` on average by more than
        `errors` standard errors of their paired difference (over every rank's images)."""
        d = (new - old).double()
        n, total, squares = distributed.all_sum(torch.stack([torch.tensor(float(len(d))), d.sum().cpu(), (d * d).sum().cpu()])
                                                .double().to(self.device)).tolist()
        mean = total / max(n, 1)
        spread = math.sqrt(max(squares / max(n, 1) - mean * mean, 0.0) / max(n, 1))
        return mean < -errors * spread

    def restore(self, model: nn.Module) -> dict:
        model.load_state_dict(self.state)
        return self.record

    def _score(self, model: nn.Module) -> tuple[dict, tuple]:
        """The held-out scores and this rank's per-image hits, losses and, with a teacher,
        divergences from it: one pass of the model (and the teacher) over the images."""
        if self.teacher is not None:
            self.teacher.rewind()
        result = evaluate(model, self.loader, self.device, task=self.task, per_image=True, teacher=self.teacher)
        scores = {"top1": result[self.task.score], "loss": result["loss"], "metric": self.task.score}
        divergence = result.get("divergence") if self.teacher is not None else None
        if divergence is not None:
            n, total = distributed.all_sum(torch.stack([torch.tensor(float(len(divergence))), divergence.sum().cpu()])
                                           .double().to(self.device)).tolist()
            scores["divergence"] = total / max(n, 1)
        return scores, (result.get("correct"), result.get("losses"), divergence)

    def _keep(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.main:
            atomic_save({"state": self.state, "record": self.record}, self.path)


class Remembered(nn.Module):
    """The teacher, its outputs on the held-out batches remembered from the first check and
    replayed on the later ones: the held-out images are the same at every check, where each
    check ran the unpruned net again for the same logits (two thirds of a check's MACs after a
    50% cut). A batch unlike the one remembered at its place (a loader that augments) runs the
    teacher."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.outputs: list[tuple[tuple, torch.Tensor]] = []  # (the batch's fingerprint, the teacher's output)
        self.position = 0

    def rewind(self) -> None:
        self.position = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.detach().double().flatten()
        place = torch.linspace(1, 2, flat.numel(), dtype=flat.dtype, device=flat.device)  # a flip changes it
        key = (tuple(images.shape), flat.sum().item(), (flat * place).sum().item())
        at, self.position = self.position, self.position + 1
        if at < len(self.outputs) and self.outputs[at][0] == key:
            return self.outputs[at][1]
        output = self.teacher(images)
        if at < len(self.outputs):
            self.outputs[at] = (key, output)
        else:
            self.outputs.append((key, output))
        return output


def summary(record: dict, images: int) -> str:
    """The terminal line: which state fit returned, and why."""
    metric = record.get("metric", "top1")
    start, later = record["start"], record.get("best_later")
    if "divergence" in start:
        return _summary_by_teacher(record, start, later, metric, images)
    if record["step"] != start["step"]:
        return (f"keep_best: returned the state after step {record['step']}: held-out {metric} "
                f"{format_score(metric, start['top1'])} at the start -> {format_score(metric, record['top1'])} "
                f"(on {images} held-out images)")
    why = ("no later state got more of them right by more than the noise"
           + (f" (the best, after step {later['step']}: {format_score(metric, later['top1'])})" if later else ""))
    return (f"keep_best: returned the starting state, held-out {metric} {format_score(metric, start['top1'])} on "
            f"{images} held-out images: {why}")


def _summary_by_teacher(record: dict, start: dict, later: dict | None, metric: str, images: int) -> str:
    if record["step"] != start["step"]:
        why = {"teacher": "the closest to the teacher",
               "labels": "a lower loss on the held-out labels by more than twice the noise"}.get(
            record.get("taken_for"), "more held-out images right by more than twice the noise")
        return (f"keep_best: returned the state after step {record['step']}, {why}: held-out {metric} "
                f"{format_score(metric, start['top1'])} at the start -> {format_score(metric, record['top1'])}, "
                f"divergence from the teacher {start['divergence']:.4f} -> {record['divergence']:.4f} (on {images} "
                "held-out images)")
    why = ("no later state came closer to the teacher's predictions by more than the noise, or got more "
           "of them right or a lower loss on their labels by more than twice the noise"
           + (f" (the closest, after step {later['step']}: {later['divergence']:.4f})" if later else ""))
    return (f"keep_best: returned the starting state, held-out divergence from the teacher {start['divergence']:.4f} "
            f"and {metric} {format_score(metric, start['top1'])} on {images} held-out images: {why}")
