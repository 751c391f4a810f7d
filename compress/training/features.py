"""Feature distillation for recovery with few images: every conv/linear layer of the pruned net
is pulled towards the output of the same layer of the unpruned teacher, on the channels it kept
(as MiR and cross distillation do, and as the least-squares refit does in closed form for one
layer at a time). A layer's kept channels are found by matching: after pruning (and the refit),
each channel of the pruned layer correlates best with the teacher channel it was cut from, so no
channel map needs to travel with the checkpoint.
"""
from __future__ import annotations

import torch
from torch import nn


class FeatureMatch:
    """Hooks on the layers the student and the teacher share by name; `loss()` after a forward
    pass of both is the mean over layers of the squared error to the teacher's kept channels,
    each layer scaled by the teacher's own channel variance (so every layer counts alike)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, images: torch.Tensor):
        ours = dict(student.named_modules())
        theirs = dict(teacher.named_modules())
        self.names = [n for n, m in ours.items() if isinstance(m, (nn.Conv2d, nn.Linear)) and n in theirs
                      and type(theirs[n]) is type(m)]
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}
        self.handles = [ours[n].register_forward_hook(self._keep(self.student_out, n)) for n in self.names]
        self.handles += [theirs[n].register_forward_hook(self._keep(self.teacher_out, n)) for n in self.names]
        was = student.training
        with torch.no_grad():
            student.eval()(images)
            teacher.eval()(images)
        student.train(was)
        self.channels = {n: matched_channels(self.student_out[n], self.teacher_out[n]) for n in self.names}
        self.scale = {n: channel_rows(self.teacher_out[n]).var(1).clamp_min(1e-6)[self.channels[n]]
                      for n in self.names}

    @staticmethod
    def _keep(store: dict, name: str):
        def hook(module, inputs, output):
            store[name] = output
        return hook

    def loss(self) -> torch.Tensor:
        terms = []
        for n in self.names:
            s, t = channel_rows(self.student_out[n]), channel_rows(self.teacher_out[n].detach())[self.channels[n]]
            terms.append((((s - t) ** 2).mean(1) / self.scale[n]).mean())
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def channel_rows(x: torch.Tensor) -> torch.Tensor:
    """(channels, everything else): a conv's (N, C, H, W) or a linear layer's (N, C)."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def matched_channels(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """For each student channel, the teacher channel it reproduces best (highest correlation);
    the identity when the layer kept every channel."""
    if student.shape[1] == teacher.shape[1]:
        return torch.arange(teacher.shape[1], device=teacher.device)
    s, t = channel_rows(student.float()), channel_rows(teacher.float())
    s = (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-8)
    t = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-8)
    return (s @ t.T).argmax(1)
