"""torch-pruning's dependency graph of a model, and what the channel space reads off it: the
groups that may be cut, the layers that must keep their width, the reshapes it cannot follow
(named by the layer before them), and a group's pruning handle."""
from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency import index_mapping

from compress.errors import CompressError
from compress.logs import heartbeat
from compress.pruning.closed_form import COUNTED

PRUNABLE = (nn.Conv2d, nn.Linear)


def example_input(input_size: int, like: nn.Module | None = None) -> torch.Tensor:
    """One random RGB image of `input_size`, on the device and dtype of `like`'s weights:
    what tracing a model (dependency graph, counting) runs on."""
    x = torch.randn(1, 3, input_size, input_size)
    return x if like is None else x.to(next(like.parameters()))


def dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's graph of `model`; the nodes of reshapes that move channels between
    dimensions (a channel or pixel shuffle) are marked `moves_channels`, so the groups that
    reach them keep their width (`channel_cut`) instead of the build failing or their indices
    being mapped as if nothing moved."""
    layers = sum(1 for m in model.modules() if isinstance(m, COUNTED))
    try:  # torch-pruning traces through autograd; its index mapping grows with the model's concatenations
        with torch.enable_grad(), heartbeat(f"torch-pruning's dependency graph of {layers} layers"), \
                _ChannelMoves() as moves, _moves_unmapped(moves):
            graph = tp.DependencyGraph().build_dependency(model, example_input, verbose=False)
    except Exception as exc:
        node = _node_at_fault(exc)
        if node is None:
            raise CompressError(f"torch-pruning could not trace the model on an input of shape "
                                f"{tuple(example_input.shape)}: {type(exc).__name__}: {exc}. Check "
                                "the input size and that the model runs on it.") from None
        raise CompressError(
            f"torch-pruning cannot follow the channels through the op {node.grad_fn.name()} after layer "
            f"'{_layer_before(node, model)}' ({type(exc).__name__}: {exc}). {type(model).__name__} cannot be "
            "pruned as a whole; prune a part of it without that op (its backbone stages, for example).") from None
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT and channel_cut(node):
            # a group that reaches this op is held whatever lies beyond it, so its search stops
            # here: through a partial add (ReXNet's x[:, :c] += shortcut) it otherwise grows for minutes
            node.dependencies = []
    return graph


# functions whose output puts input channels in other dimensions (or other channels in them)
_SHUFFLES = {torch.pixel_shuffle, torch.pixel_unshuffle, torch.channel_shuffle, torch.native_channel_shuffle,
             nn.functional.pixel_shuffle, nn.functional.pixel_unshuffle, nn.functional.channel_shuffle}
_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape}


class _ChannelMoves(TorchFunctionMode):
    """Records, while a model runs, the autograd nodes of reshapes that move channels between
    dimensions: a view of an (N, C, ...) tensor whose dimension 1 is no longer its C (a channel
    shuffle's split into groups and its merge back), and the shuffle ops themselves. A flatten
    (N, C, H, W) -> (N, C*H*W) before a linear layer is not one: torch-pruning maps it."""

    def __init__(self):
        super().__init__()
        self.grad_fns: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func in _SHUFFLES or func in _RESHAPES and _moves(args[0], out)) and getattr(out, "grad_fn", None):
            self.grad_fns.add(out.grad_fn)
        return out


def _moves(x: torch.Tensor, out: torch.Tensor) -> bool:
    if not isinstance(out, torch.Tensor) or x.dim() < 3 or out.dim() < 2 or out.shape[0] != x.shape[0]:
        return False
    flatten = out.dim() == 2 and out.shape[1] == math.prod(x.shape[1:])
    return out.shape[1] != x.shape[1] and not flatten


def _sizes_known(split) -> bool:
    """Whether torch-pruning read a split's sizes: it infers them from the layers around when
    autograd's saved sizes have a name it does not know, and through a shuffle that goes wrong."""
    sizes, offsets = split.module.split_sizes, split.module.offsets
    return (sizes is not None and offsets is not None and None not in sizes
            and len(offsets) == len(split.outputs) + 1)


@contextlib.contextmanager
def _moves_unmapped(moves: _ChannelMoves) -> Iterator[None]:
    """Between torch-pruning's trace and its index mapping, mark the nodes `moves` recorded and
    make them one-to-one ops: its reshape mapping takes any reshape for a flatten and fails on a
    shuffle's split into groups (a division by zero), and the groups through them are held anyway.
    Splits whose sizes it could not read map one to one too."""
    original = index_mapping.update_index_mapping

    def mapping(graph: tp.DependencyGraph) -> None:
        for node in graph.module2node.values():
            if node.grad_fn is not None and node.grad_fn in moves.grad_fns:
                node.moves_channels, node.type = True, tp.ops.OPTYPE.ELEMENTWISE
            if node.type == tp.ops.OPTYPE.SPLIT and not _sizes_known(node):
                node.enable_index_mapping = False  # one channel to one: a group through a split is held
        original(graph)
    index_mapping.update_index_mapping = mapping
    try:
        yield
    finally:
        index_mapping.update_index_mapping = original


def _node_at_fault(exc: BaseException):
    """The dependency-graph node torch-pruning was mapping when it failed (None: not in its graph code)."""
    node = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if isinstance(frame.f_locals.get("node"), tp.dependency.Node) and "torch_pruning" in frame.f_code.co_filename:
            node = frame.f_locals["node"]
    return node


def _layer_before(node, model: nn.Module) -> str:
    """The nearest named layer upstream of a graph node (what a user can find in the model)."""
    names = {m: n for n, m in model.named_modules()}
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.module in names:
            return names[current.module]
        frontier.extend(current.inputs)
    return "the input"


# autograd ops that take part of the channel dimension; torch-pruning maps indices through
# them as if they kept every channel
_CUTS = {"SliceBackward0": "a channel slice", "AsStridedBackward0": "a channel slice",
         "CopySlices": "a channel slice", "NarrowBackward0": "a narrow", "IndexBackward0": "an index",
         "SelectBackward0": "a select", "UnbindBackward0": "an unbind"}


def channel_cut(node) -> str | None:
    """Why a group that reaches this functional node must keep its width, if it must: a split,
    chunk or slice of the channels (pruning changes the sizes the model's code asks for)."""
    if node.type == tp.ops.OPTYPE.SPLIT:
        return "its channels reach a split or chunk, whose sizes are fixed in the model's code"
    if getattr(node, "moves_channels", False):
        return "its channels reach a reshape that moves them between dimensions (a channel or pixel shuffle)"
    name = node.grad_fn.name() if node.grad_fn is not None else ""
    if name == "SliceBackward0" and getattr(node.grad_fn, "_saved_dim", 1) != 1:
        return None  # a crop of the height or width
    return f"its channels reach {_CUTS[name]} ({name}), which torch-pruning cannot follow" if name in _CUTS else None


def misread(graph: tp.DependencyGraph, module: nn.Module, kind: str, idxs, full: int, name: str) -> str | None:
    """Why torch-pruning's indices for a layer of a group cannot be trusted, if they cannot:
    each of the layer's channels must stand for one of the group's, and each of the group's
    for the same number of the layer's (one, or several: a concatenation of a layer with a
    transform of itself, a flatten before a linear layer)."""
    pruner = graph.get_pruner_of_module(module)
    plain = [int(getattr(i, "idx", i)) for i in idxs]
    dim = None if pruner is None else pruner.get_out_channels(module) if kind == "out" else pruner.get_in_channels(module)
    if len(plain) % full or len(set(plain)) != len(plain) or (dim is not None and max(plain, default=0) >= dim):
        return (f"torch-pruning maps its {full} channels onto {len(plain)} of the {dim} "
                f"{'outputs' if kind == 'out' else 'inputs'} of layer '{name}', which it cannot prune consistently")
    return None


def channel_slices(module: nn.Module) -> int:
    """Equal slices a layer cuts its channels into: a grouped (not depthwise) conv's groups, a
    GroupNorm's groups; 1 for every other layer."""
    if isinstance(module, nn.Conv2d) and module.groups > 1 and not (
            module.groups == module.in_channels == module.out_channels):
        return module.groups
    return module.num_groups if isinstance(module, nn.GroupNorm) else 1


def pruning_group(graph: tp.DependencyGraph, model: nn.Module, name: str, idxs: list[int]):
    """torch-pruning's group of layer `name`'s output channels `idxs` (with every coupled layer)."""
    module = model.get_submodule(name)
    return graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, idxs)


def fixed_layers(model: nn.Module, graph: tp.DependencyGraph) -> list[nn.Module]:
    """Layers whose output channels are fixed: those that reach the model's output through
    parameter-free ops only (a classifier, a detector's or segmenter's head)."""
    fixed = []
    for module in model.modules():
        if not isinstance(module, PRUNABLE) or module not in graph.module2node:
            continue
        frontier, seen, reaches_output = [graph.module2node[module]], set(), False
        while frontier and not reaches_output:
            node = frontier.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if not node.outputs:
                reaches_output = True
            for nxt in node.outputs:
                if not (isinstance(nxt.module, nn.Module) and any(True for _ in nxt.module.parameters())):
                    frontier.append(nxt)  # through parameter-free ops only
        if reaches_output:
            fixed.append(module)
    return fixed
