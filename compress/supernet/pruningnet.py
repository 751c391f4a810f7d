"""MetaPruning's PruningNet for any CNN: per-layer hypernetworks generate the weights.

Each conv / linear layer gets FC -> ReLU -> FC that maps the layer's encoding (the width
ratios of the groups on its input and output, as MetaPruning feeds each block the channel
numbers of the previous and the current layer) to the full-size weight (and bias), which
the dynamic layer then crops to the sampled channels. BatchNorm has no affine parameters
(gamma 1, beta 0) and its statistics are recalibrated per candidate at search time.
With `affine_bn`, BN's gamma/beta are generated like the weights: that is what lets the
full config reproduce a pretrained model exactly (`fit_pretrained`).
"""
from __future__ import annotations

import torch
from torch import nn

from compress.pruning.space import ChannelSpace
from compress.pruning.graph import dependency_graph, example_input
from compress.supernet.dynamic import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear, Supernet, _take
from compress.supernet.slimmable import random_config
from compress.training.loop import Step


class LayerHypernet(nn.Module):
    """Encoding (width ratios) -> the layer's full-size tensors."""

    def __init__(self, groups: list[int], shapes: dict[str, torch.Size], init: dict[str, torch.Tensor],
                 hidden: int):
        super().__init__()
        self.groups = groups
        self.shapes = shapes
        self.fc1 = nn.Linear(max(1, len(groups)), hidden)
        self.fc2 = nn.Linear(hidden, sum(s.numel() for s in shapes.values()))
        with torch.no_grad():
            # Start at the model's own initialisation (the bias), with an encoding-dependent
            # part half that size, so every config begins as a sensibly scaled network.
            h = torch.relu(self.fc1(torch.ones(self.fc1.in_features)))
            scale = torch.cat([_std_like(init[n]).expand(s.numel()) for n, s in shapes.items()])
            nn.init.normal_(self.fc2.weight)
            self.fc2.weight.mul_(0.5 * scale[:, None] / h.norm().clamp_min(1e-6))
            self.fc2.bias.copy_(torch.cat([init[n].reshape(-1) for n in shapes]))

    def forward(self, encoding: torch.Tensor, sels: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
        """The layer's tensors for `encoding`, only at the channels `sels` selects (per tensor,
        one selection per leading dimension): the rows of fc2 for cropped channels are
        never computed, so generation costs what the sampled layer has, not the full one."""
        h = torch.relu(self.fc1(encoding))
        out, start = {}, 0
        for name, shape in self.shapes.items():
            n = shape.numel()
            w = self.fc2.weight[start:start + n].view(*shape, -1)
            b = self.fc2.bias[start:start + n].view(shape)
            for axis, sel in enumerate((sels or {}).get(name, ())):
                w, b = _take(w, sel, axis), _take(b, sel, axis)
            out[name] = torch.matmul(w, h) + b
            start += n
        return out

    @torch.no_grad()
    def fit(self, encoding: torch.Tensor, target: dict[str, torch.Tensor]) -> None:
        """Make `encoding` generate `target` exactly (solved for the output bias)."""
        h = torch.relu(self.fc1(encoding))
        want = torch.cat([target[n].reshape(-1) for n in self.shapes])
        self.fc2.bias.copy_(want - self.fc2.weight @ h)


def _std_like(t: torch.Tensor) -> torch.Tensor:
    std = t.float().std() if t.numel() > 1 else t.abs().float().mean()
    return (std if std > 0 else torch.tensor(0.01)).reshape(1)


class PruningNet(Supernet):
    method = "pruningnet"

    def __init__(self, model: nn.Module, space: ChannelSpace, hidden: int = 32, affine_bn: bool = False):
        super().__init__(model, space)
        self.hidden, self.affine_bn = hidden, affine_bn
        self.hypers = nn.ModuleDict()
        self._layers: dict[str, str] = {}  # hypernet key -> layer name
        for name, module in model.named_modules():
            tensors = _generated_tensors(module, affine_bn)
            if not tensors:
                continue
            groups = sorted({g for kind in ("out", "in") for g, _, _ in self.layer_dims.get((name, kind), _NoDim).parts})
            key = name.replace(".", "__")
            self.hypers[key] = LayerHypernet(groups, {n: t.shape for n, t in tensors.items()}, tensors, hidden)
            self._layers[key] = name
            for t in tensors.values():
                t.requires_grad_(False)  # generated from now on
        for module in model.modules():
            if isinstance(module, DynamicBatchNorm2d) and not affine_bn:
                module.generated = {"weight": None, "bias": None}
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
        # Not a buffer: DDP would overwrite each rank's own config with rank 0's.
        self._ratios = torch.ones(len(space.groups))

    def set_config(self, config, track: bool = True) -> None:
        super().set_config(config, track)
        self._ratios = torch.tensor(self.space.vector(self.config) / self._full, dtype=torch.float32)

    def _encoding(self, hyper: LayerHypernet) -> torch.Tensor:
        device = hyper.fc1.weight.device
        return self._ratios[hyper.groups].to(device) if hyper.groups else torch.ones(1, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = [self.model.get_submodule(self._layers[key]) for key in self.hypers]
        for module, hyper in zip(modules, self.hypers.values()):
            module.generated = {**(module.generated or {}), **hyper(self._encoding(hyper), module.selections())}
        try:
            return self.model(x)
        finally:  # autograd keeps what backward needs; the modules must not hold graph tensors
            for module in modules:
                module.generated = {k: v for k, v in module.generated.items() if v is None} or None

    @torch.no_grad()
    def fit_pretrained(self) -> None:
        """Make the full config generate the model's current (pretrained) weights exactly."""
        self.set_config(self.space.max())
        for key, hyper in self.hypers.items():
            module = self.model.get_submodule(self._layers[key])
            hyper.fit(self._encoding(hyper), {n: getattr(module, n) for n in hyper.shapes})

    @torch.no_grad()
    def plain_copy(self) -> nn.Module:
        generated = {self._layers[k]: h(self._encoding(h)) for k, h in self.hypers.items()}
        model = super().plain_copy()
        for module_name, module in model.named_modules():
            for name, tensor in generated.get(module_name, {}).items():
                getattr(module, name).copy_(tensor)
            if isinstance(module, nn.BatchNorm2d) and module.affine and not self.affine_bn:
                module.weight.fill_(1.0)
                module.bias.zero_()
        return model

    @torch.no_grad()
    def extract(self, config) -> nn.Module:
        """The standalone pruned model of `config`, its BN-followed convs brought back to the
        usual initialisation scale (`rescale_convs`) so that fine-tuning moves them."""
        net = super().extract(config)
        rescale_convs(net, example_input(self.space.input_size[-1], net))
        return net


@torch.no_grad()
def rescale_convs(model: nn.Module, example: torch.Tensor) -> None:
    """Scale each conv whose output feeds only a BatchNorm so its weights have the RMS of
    He initialisation (fan-out, as torchvision initialises CNNs) to within 2x, and that BN's
    running statistics with it. Factors are powers of two, so scaling adds no rounding error.

    BN makes such a conv's output scale-free, so the function is unchanged (exactly in eval
    mode: the running variance absorbs BN's eps too), but SGD's effective step on it is
    lr / |w|^2: a hypernetwork's generated weights are typically 10x (up to 100x) that
    scale, and fine-tuning them at a normal learning rate then barely moves them. The factor
    is per output channel; a channel's variance stays above 100x eps, so batch statistics in
    training see eps as before to 0.5%, and a channel already below that keeps its scale.
    """
    graph = dependency_graph(model.eval(), example)
    for module, node in graph.module2node.items():
        if not isinstance(module, nn.Conv2d) or len(node.outputs) != 1:
            continue
        bn = node.outputs[0].module
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
            continue
        w = module.weight
        rms = w.pow(2).mean().sqrt()
        if rms == 0:
            continue
        target = (2.0 / (w.shape[0] * w[0, 0].numel())) ** 0.5 / rms
        floor = (100 * bn.eps / bn.running_var.clamp_min(1e-30)).sqrt()
        factor = torch.where(floor > 1, 1.0, floor.clamp(min=float(target)))
        factor = 2.0 ** factor.log2().trunc()  # exact in floating point; rounded towards 1
        w.mul_(factor.view(-1, *[1] * (w.dim() - 1)))
        if module.bias is not None:
            module.bias.mul_(factor)
        bn.running_mean.mul_(factor)
        bn.running_var.copy_(factor ** 2 * (bn.running_var + bn.eps) - bn.eps)


class _NoDim:
    parts = ()


def _generated_tensors(module: nn.Module, affine_bn: bool) -> dict[str, torch.Tensor]:
    if isinstance(module, (DynamicConv2d, DynamicLinear)) or (
            affine_bn and isinstance(module, DynamicBatchNorm2d) and module.affine):
        return {n: p for n, p in (("weight", module.weight), ("bias", module.bias)) if p is not None}
    return {}


def pruningnet_step(supernet: PruningNet, label_smoothing: float = 0.1) -> Step:
    """A new random config per batch (per-group widths), cross-entropy on the labels."""
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def step(net, images, labels, backward):
        supernet.set_config(random_config(supernet.space), track=False)
        loss = criterion(net(images), labels)
        backward(loss)
        return loss.detach()
    return step
