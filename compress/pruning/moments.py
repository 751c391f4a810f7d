"""Per-channel mean and variance of activations, accumulated over batches: each batch's own
float32 reductions (which read the activations once) merged in float64 (Chan et al.), so the
result matches a float64 pass over all images at a fraction of its cost."""
from __future__ import annotations

import torch


class ChannelMoments:
    """Running per-channel mean and variance of the tensors passed to `add`: channels on dim 1
    (conv activations, N x C x ...) or, with `last=True`, on the last dim (a linear layer's)."""

    def __init__(self, last: bool = False) -> None:
        self.last = last
        self.n = 0
        self.mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None  # sum of squared deviations from the mean

    def add(self, t: torch.Tensor) -> None:
        dims = tuple(range(t.dim() - 1)) if self.last else (0, *range(2, t.dim()))  # all but the channels
        var, mean = torch.var_mean(t.detach(), dim=dims, correction=0)
        mean, var = mean.double(), var.double()
        m = t.numel() // t.shape[-1 if self.last else 1]
        if self.mean is None:
            self.mean, self._m2 = mean, var * m
        else:
            n, delta = self.n, mean - self.mean
            self.mean = self.mean + delta * m / (n + m)
            self._m2 = self._m2 + var * m + delta ** 2 * n * m / (n + m)
        self.n += m

    @property
    def variance(self) -> torch.Tensor:
        return self._m2 / self.n
