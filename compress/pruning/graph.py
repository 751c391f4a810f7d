"""torch-pruning's dependency graph of a model, and what the channel space reads off it: the
groups that may be cut, the layers that must keep their width, the reshapes it cannot follow
(named by the layer before them), and a group's pruning handle."""
from __future__ import annotations

import traceback

import torch
import torch_pruning as tp
from torch import nn

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
    layers = sum(1 for m in model.modules() if isinstance(m, COUNTED))
    try:  # torch-pruning traces through autograd; its index mapping grows with the model's concatenations
        with torch.enable_grad(), heartbeat(f"torch-pruning's dependency graph of {layers} layers"):
            return tp.DependencyGraph().build_dependency(model, example_input, verbose=False)
    except Exception as exc:
        node = _node_at_fault(exc)
        if node is None:
            raise CompressError(f"torch-pruning could not trace the model on an input of shape "
                                f"{tuple(example_input.shape)}: {type(exc).__name__}: {exc}. Check "
                                "the input size and that the model runs on it.") from None
        raise CompressError(
            f"torch-pruning cannot follow the channels through the op {node.grad_fn.name()} after layer "
            f"'{_layer_before(node, model)}' ({type(exc).__name__}: {exc}): a reshape that moves channels between "
            f"dimensions, like ShuffleNet's channel shuffle or a pixel shuffle. {type(model).__name__} cannot be "
            "pruned as a whole; prune a part of it without that op (its backbone stages, for example), or write the "
            "shuffle as a module of its own and keep it out of the pruned part.") from None


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
