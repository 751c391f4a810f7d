"""The layers a latency model reads: every conv / linear layer of a channel space, with how
its input and output widths follow the group widths, and the work each does at a config.

A runtime fuses each conv with its BN and a clamping activation (and, in XNNPACK, the add after it), so
a layer's time is modelled from what that fused op computes and moves: its MACs, the elements
it reads and the elements it writes. Kernels differ in speed by kind (a depthwise conv is
memory-bound, a 1x1 conv a matrix product), so each kind keeps its own terms.

An activation a runtime cannot fold into the conv before it (anything but a clamp: hard-swish,
SiLU, GELU, sigmoid) runs as an op of its own over that conv's output; its elements are a kind
of work of their own. In an int8 TFLite MobileNetV3 that op is 57% of the unpruned file's
predicted time, and reading it took the unseen configs predicted within +-5% from 60% to 100%
(benchmarks/RESULTS.md).

A kernel computes whole tiles of channels (a GEMM micro-kernel's output columns, an int8
kernel's packed inputs), so the MACs it spends are those of the widths rounded up to its tile.
The tile is the runtime's and the CPU's (16 floats in an AVX-512 register, 8 in a NEON pair):
`TILES` are the candidates a latency model chooses among by its samples (`model.py`).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from compress.pruning.graph import example_input
from compress.pruning.space import ChannelSpace
from compress.supernet.dynamic import Supernet

KINDS = ("conv", "pointwise", "depthwise", "linear")
TERMS = ("macs", "reads", "writes")
# the elements a conv whose widths are not whole tiles reads and writes: ONNX Runtime runs it
# outside its blocked layout, reordering around it
FEATURES = (*(f"{kind}_{term}" for kind in KINDS for term in TERMS), "unaligned_moves", "activation_elements")
# activations every runtime folds into the conv before them as a clamp of its output
FOLDED = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity)
ACTIVATIONS = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Mish, nn.Tanh, nn.ELU, nn.LeakyReLU,
               nn.PReLU, *FOLDED)
# (channels per tile, whether a layer's inputs are rounded up too or only its outputs)
TILES = ((1, False), (8, False), (8, True), (16, False), (16, True), (32, False), (32, True))


def tile_name(tile: tuple[int, bool]) -> str:
    """A tile as a latency model records it: 16o (outputs rounded up to 16), 16io (inputs too)."""
    size, inputs_too = tile
    return f"{size}{'io' if inputs_too else 'o'}"


def layer_records(model: nn.Module, space: ChannelSpace) -> list[dict]:
    """Every conv/linear layer: its kind, the pixels it reads and writes, how its input/output
    widths follow the group widths (`parts`: group, repeats), and the activation applied to its
    output as an op of its own (`activation`, None when there is none or it is folded)."""
    supernet = Supernet(copy.deepcopy(model), space)
    dims = supernet.layer_dims
    plain = supernet.plain_copy().eval()
    shapes, activation, ran = {}, {}, []  # ran: (layer, its output shape) in the order they ran

    def record(name, module, inputs, output):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            shapes[name] = (inputs[0].shape, output.shape)
            ran.append((name, output.shape))
        else:  # an activation acts on the output of the last layer that made its shape
            made = next((n for n, shape in reversed(ran) if shape == output.shape), None)
            if made is not None and made not in activation:
                activation[made] = None if isinstance(module, FOLDED) else type(module).__name__
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: record(n, m, i, o))
             for n, m in plain.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, *ACTIVATIONS))]
    with torch.no_grad():
        plain(example_input(space.input_size[-1], plain))
    for h in hooks:
        h.remove()
    layers = []
    for name, m in plain.named_modules():
        if name not in shapes:
            continue
        conv = isinstance(m, nn.Conv2d)
        depthwise = conv and m.groups > 1 and m.groups == m.in_channels == m.out_channels

        def dim(kind, full):
            d = dims.get((name, kind))
            parts = [] if d is None else [[space.groups[g].name, len(idxs) // space.groups[g].max]
                                          for g, idxs, _ in d.parts]
            return {"full": full, "parts": parts}
        seen, made = shapes[name]
        kind = ("linear" if not conv else "depthwise" if depthwise else
                "pointwise" if m.kernel_size == (1, 1) and m.groups == 1 else "conv")
        layers.append({
            "name": name, "kind": kind,
            "pixels_in": int(np.prod(seen[2:])) if conv else 1, "pixels_out": int(np.prod(made[2:])) if conv else 1,
            "kernel": int(np.prod(m.kernel_size)) if conv else 1, "groups": m.groups if conv else 1,
            # a depthwise conv's input channels are its output channels
            "in": dim("out" if depthwise else "in", m.in_channels if conv else m.in_features),
            "out": dim("out", m.out_channels if conv else m.out_features), "activation": activation.get(name)})
    return layers


def width(dim: dict, config: Mapping[str, int], space: ChannelSpace) -> int:
    return dim["full"] - sum(reps * (space.by_name[g].max - config[g]) for g, reps in dim["parts"])


def features(layers: list[dict], config: Mapping[str, int], space: ChannelSpace,
             tile: tuple[int, bool] = (1, False)) -> np.ndarray:
    """The work of every layer kind at `config`, in the order of FEATURES; MACs are counted on
    widths rounded up to `tile` (see TILES)."""
    size, inputs_too = tile
    up = lambda c: -(-c // size) * size  # noqa: E731
    out = dict.fromkeys(FEATURES, 0.0)
    for layer in layers:
        cin, cout = width(layer["in"], config, space), width(layer["out"], config, space)
        per_group = cin // max(1, layer["groups"])
        per_out = layer["kernel"] * (1 if layer["kind"] == "depthwise" else up(per_group) if inputs_too else per_group)
        kind = layer["kind"]
        out[f"{kind}_macs"] += per_out * up(cout) * layer["pixels_out"]
        out[f"{kind}_reads"] += cin * layer["pixels_in"]
        out[f"{kind}_writes"] += cout * layer["pixels_out"]
        if layer.get("activation"):
            out["activation_elements"] += cout * layer["pixels_out"]
        if kind != "linear" and (cin % size or cout % size):
            out["unaligned_moves"] += cin * layer["pixels_in"] + cout * layer["pixels_out"]
    return np.array([out[f] for f in FEATURES])
