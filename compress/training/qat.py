"""Quantization-aware recovery: training through the int8 arithmetic the exported file will
run (Jacob et al. 2018), so that post-training quantization of the result loses little.

The model is traced (torch.fx) and every tensor the int8 file stores gets a fake quantizer
over its running range; every conv and linear weight is moved onto the per-channel grid of
its BN-folded form (compress/int8.py), folded with the running statistics of that step, so the
weights released at the end lie on the grid the converter folds them to. BatchNorm normalizes by
each batch's statistics while this trains, as in the float epochs: frozen statistics (the fold
the file runs) let a training lr blow the activations up within a few steps, since nothing then
rescales what the weights' updates grow (the demo's pruned MobileNetV2, 30 steps at lr 0.005:
75% -> 16% top-1 frozen, 69% with batch statistics, 68% as a float net; the demo's
quantization-aware epoch went from 58% to 76% on the test set). The ranges are measured, and the
net scored, with the running statistics, as the file computes. Gradients pass straight through
the rounding.

Where the file keeps no tensor of its own, nothing is quantized: a conv's output when its
BatchNorm or ReLU/ReLU6 is fused into it (an add's too, for the ReLU), and reshapes, dropout,
max-pooling, which keep their input's scale.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F
from torch.nn.utils import parametrize

from compress.errors import CompressError
from compress.int8 import activation_on_grid, bn_fold, conv_bn_pairs, weight_on_grid

# an output the next op absorbs: BN folds into the conv or linear before it; ReLU and ReLU6
# become the fused activation of a conv, a linear or an add
FUSED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
FUSED_ACTIVATION_FUNCTIONS = (F.relu, torch.relu, F.relu6)
ADDS = (operator.add, operator.iadd, torch.add)
# ops whose output keeps its input's quantization
SAME_SCALE_MODULES = (nn.Flatten, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.Unflatten)
SAME_SCALE_FUNCTIONS = (torch.flatten, torch.reshape, F.dropout, F.max_pool2d, operator.getitem)
SAME_SCALE_METHODS = ("flatten", "view", "reshape", "contiguous", "permute", "transpose", "squeeze",
                      "unsqueeze", "size")
RANGE_MOMENTUM = 0.05  # what LiteRT's calibrator averages its per-image ranges with (0.95 kept)


class ActivationRange(nn.Module):
    """A fake int8 quantizer whose range is a running average of per-image minima and maxima
    (as LiteRT's calibration measures it), or with `whole` of each batch's (as the export
    calibrates the graph's input and output, compress/export/quantize.py), updated in
    training, fixed in eval."""

    def __init__(self, whole: bool = False):
        super().__init__()
        self.whole = whole
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                dims = tuple(range(1, x.dim()))
                low, high = x.detach().amin(dims).float(), x.detach().amax(dims).float()
                low, high = (low.min(), high.max()) if self.whole else (low.mean(), high.mean())
                if not self.seen:
                    self.low.copy_(low), self.high.copy_(high), self.seen.fill_(True)
                else:
                    self.low.lerp_(low, RANGE_MOMENTUM), self.high.lerp_(high, RANGE_MOMENTUM)
        return activation_on_grid(x.float(), self.low, self.high).to(x.dtype)  # autocast: rounded in float32


class _OnGrid(nn.Module):
    """A weight parametrization: the weight on the int8 grid of its BN-folded form."""

    def __init__(self, bn: nn.BatchNorm2d | None):
        super().__init__()
        self._bn = [bn]  # a list, so the BN is not registered (and saved) a second time here

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight_on_grid(weight, bn_fold(weight, self._bn[0]))


class QuantizationAware(nn.Module):
    """`model` (shared, not copied) as it runs in int8: build with `quantization_aware`, train,
    then `release` gives back the plain model with its weights on the int8 grid."""

    def __init__(self, traced: fx.GraphModule, model: nn.Module, layers: list[nn.Module]):
        super().__init__()
        self.traced = traced
        self._model, self._layers = [model], layers  # lists: neither is a second submodule tree

    def forward(self, x: torch.Tensor):
        return self.traced(x)

    @torch.no_grad()
    def measure_ranges(self, batches: Iterable[torch.Tensor]) -> None:
        """Set the activation ranges from `batches` of inputs before training moves them, so
        the int8 net is scored from its first step as calibration would quantize it (through
        the running statistics, which these batches leave as they were)."""
        was_training = self.training
        self.train()
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        for images in batches:
            self(images)
        self.train(was_training)

    def release(self) -> nn.Module:
        """The model, its weights left on the grid (plain parameters again), no quantizers."""
        for layer in self._layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        self._layers = []
        return self._model[0]


def quantization_aware(model: nn.Module, example: torch.Tensor) -> QuantizationAware:
    """`model` wrapped to train as its int8 export will compute (see the module's doc).
    `example`: an input batch, for tracing the tensors' shapes."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:
        raise CompressError(f"quantization-aware recovery (`qat_epochs`) traces the model with torch.fx, and "
                            f"{type(model).__name__} does not trace ({type(exc).__name__}: {str(exc)[:300]}). Set "
                            "`qat_epochs: 0` and export with post-training int8 (`keep_float` for the sensitive "
                            "layers).") from None
    was_training = model.training
    with torch.no_grad():
        ShapeProp(traced.eval()).propagate(example)
    modules = dict(traced.named_modules())
    for index, node in enumerate(list(traced.graph.nodes)):
        if _stores_tensor(node, modules):
            name = f"act_quant_{index}"
            ends = node.op == "placeholder" or any(user.op == "output" for user in node.users)
            traced.add_submodule(name, ActivationRange(whole=ends))  # as the export calibrates the graph's ends
            with traced.graph.inserting_after(node):
                quant = traced.graph.call_module(name, (node,))
            node.replace_all_uses_with(quant, delete_user_cb=lambda user: user is not quant)
    traced.recompile()
    layers = []
    for layer, bn in conv_bn_pairs(model, example):
        parametrize.register_parametrization(layer, "weight", _OnGrid(bn))
        layers.append(layer)
    wrapped = QuantizationAware(traced, model, layers)
    wrapped.train(was_training)
    return wrapped


def _stores_tensor(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the int8 file holds `node`'s output as a quantized tensor of its own."""
    if node.op not in ("placeholder", "call_module", "call_function", "call_method"):
        return False
    if not isinstance(node.meta.get("tensor_meta"), fx.passes.shape_prop.TensorMetadata):
        return False
    if not node.meta["tensor_meta"].dtype.is_floating_point:
        return False
    if _same_scale(node, modules):
        return False
    return not (node.users and all(_absorbs(user, node, modules) for user in node.users))


def _same_scale(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], SAME_SCALE_MODULES)
    if node.op == "call_function":
        return node.target in SAME_SCALE_FUNCTIONS
    return node.op == "call_method" and node.target in SAME_SCALE_METHODS


def _absorbs(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `user` is fused into `node`, the op producing its input."""
    produced_by = modules.get(node.target) if node.op == "call_module" else None
    if user.op == "call_module" and isinstance(modules[user.target], nn.modules.batchnorm._BatchNorm):
        return isinstance(produced_by, (nn.Conv2d, nn.Linear))
    fusing = ((user.op == "call_module" and isinstance(modules[user.target], FUSED_ACTIVATIONS))
              or (user.op == "call_function" and user.target in FUSED_ACTIVATION_FUNCTIONS))
    if not fusing:
        return False
    return (isinstance(produced_by, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))
            or (node.op == "call_function" and node.target in ADDS))
