"""MACs and parameters as closed-form functions of the group widths: each layer dimension an
affine function of the widths, recorded once from one forward pass, so a config's counts need
no forward pass and equal thop's count of the materialized model."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)  # the layers whose MACs count (thop's convention)


class Affine:
    """Each row is a layer dimension written as const + sum_g coef_g * width_g."""

    def __init__(self, n_groups: int):
        self.n = n_groups
        self.rows: list[tuple[dict[int, float], float]] = []

    def add(self, coefs: dict[int, float], const: float) -> int:
        self.rows.append((coefs, const))
        return len(self.rows) - 1

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        a = np.zeros((len(self.rows), self.n))
        b = np.zeros(len(self.rows))
        for i, (coefs, const) in enumerate(self.rows):
            for g, c in coefs.items():
                a[i, g] = c
            b[i] = const
        return a, b


class Bilinear:
    """A count of the form sum_t scale_t * dim[p_t] * dim[q_t] (dim -1 means 1)."""

    def __init__(self, terms: list[tuple[float, int, int]], a: np.ndarray, b: np.ndarray):
        ones_row = len(b)
        self.a = np.vstack([a, np.zeros((1, a.shape[1]))])
        self.b = np.append(b, 1.0)
        self.scale = np.array([t[0] for t in terms], dtype=np.float64)
        self.p = np.array([t[1] if t[1] >= 0 else ones_row for t in terms], dtype=np.int64)
        self.q = np.array([t[2] if t[2] >= 0 else ones_row for t in terms], dtype=np.int64)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        dims = w @ self.a.T + self.b  # (..., n_dims)
        return np.rint((dims[..., self.p] * dims[..., self.q]) @ self.scale).astype(np.int64)


def counters(model: nn.Module, example_input: torch.Tensor, dims_of: dict,
              n_groups: int) -> tuple[Bilinear, Bilinear]:
    """Write MACs and params as bilinear forms in the group widths (recorded once).

    A layer dimension covered by groups g (n_g of its channels at full width n_g = r_g *
    max_g) is const + sum_g r_g * width_g; a conv's MACs are spatial * k * out * in/groups.
    """
    spatial = {}
    def positions(module, inputs, output):  # where a layer is applied: pixels of a conv, leading dims of a linear
        channels = output.shape[-1] if isinstance(module, nn.Linear) else output.shape[1]
        # summed over calls: a head shared by the levels of a feature pyramid runs once per level
        spatial[module] = spatial.get(module, 0) + output[0].numel() // channels

    hooks = [m.register_forward_hook(positions) for m in model.modules() if isinstance(m, COUNTED)]
    with torch.no_grad():
        model(example_input)
    for h in hooks:
        h.remove()

    aff = Affine(n_groups)

    def dim(module: nn.Module, kind: str, full: int) -> int:
        cover = dims_of.get((module, kind), {})
        return aff.add({g: n / g_full for g, (n, g_full) in cover.items()},
                       full - sum(n for n, _ in cover.values()))

    macs, params = [], []
    for module in model.modules():  # each module's own parameters: every parameter once
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):  # thop counts both alike
            out = dim(module, "out", module.out_channels)
            k = module.kernel_size[0] * module.kernel_size[1]
            if module.groups == module.in_channels == module.out_channels and module.groups > 1:
                macs.append((spatial.get(module, 0) * k, out, -1))  # depthwise: in/groups == 1
                params.append((k, out, -1))
            else:
                inp = dim(module, "in", module.in_channels)
                macs.append((spatial.get(module, 0) * k / module.groups, out, inp))
                params.append((k / module.groups, out, inp))
            if module.bias is not None:
                params.append((1, out, -1))
        elif isinstance(module, nn.Linear):
            out, inp = dim(module, "out", module.out_features), dim(module, "in", module.in_features)
            macs.append((spatial.get(module, 0), out, inp))
            params.append((1, out, inp))
            if module.bias is not None:
                params.append((1, out, -1))
        else:
            for p in module.parameters(recurse=False):
                if (id(p), "out") in dims_of:  # a loose parameter pruned along one dimension
                    size = sum(n for n, _ in dims_of[(id(p), "out")].values())
                    params.append((p.numel() / size, dim(id(p), "out", size), -1))
                    continue
                covered = (module, "out") in dims_of and p.dim() == 1
                params.append((1, dim(module, "out", p.numel()), -1) if covered else (p.numel(), -1, -1))
    a, b = aff.matrices()
    return Bilinear(macs, a, b), Bilinear(params, a, b)
