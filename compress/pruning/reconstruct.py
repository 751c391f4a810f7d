"""Least-squares reconstruction after pruning (He et al. 2017, ThiNet): each layer that lost
input channels is refitted so that, on a few hundred real images, its output matches the
unpruned layer's output from the channels that remain.

Layers are refitted in execution order on the *pruned* network's inputs, so each one also
absorbs the error its predecessors left behind. Only plain convs and linear layers are refitted
(a depthwise conv mixes no channels, so it has nothing to recombine).

Both networks run once, node by node over all images in lockstep (torch.fx): when the walk
reaches a layer to refit, every image's input to it (pruned net) and output of it (unpruned
net) are at hand, the layer is solved and the walk goes on through the refitted layer. Cached
activations are bounded (`cache_mb`): where they are large (early, high-resolution layers)
fewer images take part, and more join, run up to the walk's position through the layers
already final, as the activations shrink. A model torch.fx cannot trace is refitted the slow
way, one forward pass from the input per layer and batch.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import fx, nn
from torch.nn import functional as F
from tqdm import tqdm

# module name -> (kept output indices, kept input indices) in the unpruned layer's numbering
ChannelMap = Mapping[str, tuple[Sequence[int], Sequence[int]]]
# per layer to refit, in order: its name and (pruned net's input, unpruned net's output) per batch
LayerData = Iterator[tuple[str, Iterator[tuple[torch.Tensor, torch.Tensor]]]]


def mixes_channels(module: nn.Module) -> bool:
    """A layer whose outputs are weighted sums over its input channels (not a depthwise or
    grouped conv)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the channel-mixing layers in the order a forward pass reaches them."""
    names = {m: n for n, m in model.named_modules()}
    order, handles = [], []
    for module in names:
        if mixes_channels(module):
            handles.append(module.register_forward_hook(lambda m, i, o: order.append(names[m])))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


@torch.no_grad()
def reconstruct(original: nn.Module, pruned: nn.Module, kept: ChannelMap, images: torch.Tensor,
                batch_size: int = 64, max_rows: int = 4096, ridge: float | None = None, seed: int = 0,
                progress: bool = False, cache_mb: int = 2048, lockstep: bool = True) -> list[str]:
    """Refit `pruned`'s channel-mixing layers in place, from the first one that lost input
    channels on, so each reproduces `original`'s output on `images`: ridge regression pulled
    towards the layer's unpruned weights, its strength per layer the one of RIDGE_GRID that
    predicts best on images it was not fitted on (`ridge` fixes it instead). `kept` maps layer
    names to the channels each one kept; `cache_mb` bounds the activations held at once.
    `lockstep=False` takes the per-layer forward passes a model torch.fx cannot trace gets (the
    same result, slower). Returns the names of the refitted layers."""
    original.eval()
    pruned.eval()
    device = next(pruned.parameters()).device
    order = execution_order(pruned, images[:1].to(device))
    start = next((i for i, name in enumerate(order)
                  if name in kept and len(kept[name][1]) < _in_features(original.get_submodule(name))), None)
    if start is None:
        return []
    todo = order[start:]
    batches = list(images.split(batch_size))
    try:
        if not lockstep:
            raise _Untraceable
        layers = _lockstep(original, pruned, todo, batches, device, cache_mb << 20)
    except _Untraceable:
        layers = _per_layer(original, pruned, todo, batches, device)
    generator = torch.Generator().manual_seed(seed)
    refitted = []
    for name, pairs in tqdm(layers, total=len(todo), desc="reconstruct", unit="layer", disable=not progress,
                            leave=False):
        layer, reference = pruned.get_submodule(name), original.get_submodule(name)
        out_idx, in_idx = kept.get(name, (range(_out_features(reference)), range(_in_features(reference))))
        out_idx = torch.as_tensor(list(out_idx), device=device)
        grams, crosses = [0, 0], [0, 0]  # over even and odd batches: the two halves of a cross-validation
        for i, (x, y) in enumerate(pairs):
            rows, target = _sample(layer, x, y, max_rows, generator)
            target = target.index_select(1, out_idx)
            if reference.bias is not None:
                target = target - reference.bias[out_idx]
                rows = torch.cat([rows, torch.ones(len(rows), 1, device=device)], 1)
            # float32 products (per batch, few thousand rows) summed in float64: fast and exact enough
            grams[i % 2] = grams[i % 2] + (rows.T @ rows).double()
            crosses[i % 2] = crosses[i % 2] + (rows.T @ target).double()
        prior = _kept_weight(reference, out_idx, list(in_idx)).double()
        if reference.bias is not None:
            prior = torch.cat([prior, torch.zeros(len(out_idx), 1, dtype=prior.dtype, device=device)], 1)
        strength = ridge if ridge is not None else _cross_validated(grams, crosses, prior.T)
        solution = _ridge(grams[0] + grams[1], crosses[0] + crosses[1], prior.T, strength).T
        if reference.bias is not None:
            layer.bias.copy_(reference.bias[out_idx] + solution[:, -1].to(layer.bias))
            solution = solution[:, :-1]
        layer.weight.copy_(solution.reshape(layer.weight.shape).to(layer.weight))
        refitted.append(name)
    return refitted


# Ridge strengths tried, relative to the mean of the Gram matrix's diagonal (its scale). The
# refit's worst failure is not a poor fit but an over-fit one: a layer with many inputs fitted on
# few rows (a classifier sees one row per image) reproduces its targets with weights many times
# the unpruned ones' norm, and the net it makes is so sharp that the first fine-tuning steps wreck
# it. Held-out error catches that; infinity keeps the unpruned weights of the kept channels.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)
FALLBACK_RIDGE = 1e-2  # when too few batches took part to cross-validate


def _ridge(gram: torch.Tensor, cross: torch.Tensor, prior: torch.Tensor, strength: float) -> torch.Tensor:
    """argmin_W |XW - Y|^2 + lam |W - prior|^2, from X'X and X'Y, lam = strength * mean diag(X'X)."""
    if math.isinf(strength):
        return prior.clone()
    lam = strength * gram.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device),
                              cross + lam * prior)


def _cross_validated(grams: list, crosses: list, prior: torch.Tensor) -> float:
    """The strength of RIDGE_GRID whose fit on one half of the batches best predicts the other
    half (summed over both ways): |XW - Y|^2 = tr(W'X'XW) - 2 tr(W'X'Y) + const."""
    if not all(isinstance(g, torch.Tensor) for g in grams):
        return FALLBACK_RIDGE

    def held_out_error(strength: float) -> float:
        error = 0.0
        for fit, test in ((0, 1), (1, 0)):
            w = _ridge(grams[fit], crosses[fit], prior, strength)
            error += float((w * (grams[test] @ w)).sum() - 2 * (w * crosses[test]).sum())
        return error
    return min(RIDGE_GRID, key=held_out_error)


class _Untraceable(Exception):
    """torch.fx cannot trace the model, or traces the two nets into different graphs."""


def _graphs(original: nn.Module, pruned: nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    try:
        graphs = fx.symbolic_trace(original), fx.symbolic_trace(pruned)
    except Exception as exc:  # data-dependent control flow and the like
        raise _Untraceable from exc
    nodes = [list(g.graph.nodes) for g in graphs]
    same = len(nodes[0]) == len(nodes[1]) and all(
        a.op == b.op and a.target == b.target for a, b in zip(*nodes))
    if not same or sum(n.op == "placeholder" for n in nodes[0]) != 1:
        raise _Untraceable
    return graphs


def _lockstep(original: nn.Module, pruned: nn.Module, todo: list[str], batches: list[torch.Tensor],
              device: torch.device, cache_bytes: int) -> LayerData:
    """Run both nets node by node over the batches; at each layer of `todo` (its first call)
    hand over its data, and run it once the caller has refitted it."""
    graphs = _graphs(original, pruned)  # raises before the first layer is handed over
    return _walk(graphs, todo, batches, device, cache_bytes)


def _walk(graphs, todo, batches, device, cache_bytes) -> LayerData:
    nodes = [list(g.graph.nodes) for g in graphs]
    runners = [fx.Interpreter(g, garbage_collect_values=False) for g in graphs]
    # values to drop after node i: those no later node reads (the output node reads the result)
    dead = [[[] for _ in nodes[0]] for _ in graphs]
    for k, graph_nodes in enumerate(nodes):
        last = {}
        for i, node in enumerate(graph_nodes):
            for used in node.all_input_nodes:
                last[used] = i
        for used, i in last.items():
            dead[k][i].append(used)
    refit_at = {}
    for i, node in enumerate(nodes[0]):
        if node.op == "call_module" and node.target in todo and node.target not in refit_at.values():
            refit_at[i] = node.target  # a module called twice is refitted at its first call
    joinable = _images_per_node(runners, nodes, dead, batches[0][:1].to(device), cache_bytes)

    def run(i: int, env: list[dict], nets=(0, 1)) -> None:
        for k in nets:
            runners[k].env = env[k]
            env[k][nodes[k][i]] = runners[k].run_node(nodes[k][i])
            for used in dead[k][i]:
                del env[k][used]

    envs: list[list[dict]] = []  # per batch taking part: the live values of each net
    for i in range(1, len(nodes[0]) - 1):  # between the input and the output node
        while len(envs) < len(batches) and (not envs or sum(map(len, batches[:len(envs) + 1])) <= joinable[i]):
            x = batches[len(envs)].to(device)
            env = [{nodes[0][0]: x}, {nodes[1][0]: x}]
            for j in range(1, i):  # through the layers already final
                run(j, env)
            envs.append(env)
        if i in refit_at:
            for env in envs:
                run(i, env, nets=(0,))
            arg, out = nodes[1][i].args[0], nodes[0][i]
            yield refit_at[i], ((env[1][arg], env[0][out]) for env in envs)
            for env in envs:
                run(i, env, nets=(1,))
        else:
            for env in envs:
                run(i, env)


def _images_per_node(runners, nodes, dead, image: torch.Tensor, cache_bytes: int) -> list[int]:
    """How many images can take part from each node on, so that the values held for them (both
    nets) stay under `cache_bytes` for the rest of the walk: measured on one image."""
    env = [{nodes[0][0]: image}, {nodes[1][0]: image}]
    held = [0] * len(nodes[0])
    for i in range(1, len(nodes[0]) - 1):
        for k in (0, 1):
            runners[k].env = env[k]
            env[k][nodes[k][i]] = runners[k].run_node(nodes[k][i])
        held[i] = sum(_bytes(v) for k in (0, 1) for v in env[k].values())
        for k in (0, 1):
            for used in dead[k][i]:
                del env[k][used]
    most = 0
    for i in reversed(range(len(held))):
        most = max(most, held[i])
        held[i] = cache_bytes // max(most, 1)
    return held


def _bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(map(_bytes, value))
    if isinstance(value, dict):
        return sum(map(_bytes, value.values()))
    return 0


def _per_layer(original: nn.Module, pruned: nn.Module, todo: list[str], batches: list[torch.Tensor],
               device: torch.device) -> LayerData:
    """The slow way, for a model torch.fx cannot trace: for each layer and batch, one forward
    pass of each net from the input, stopped at that layer."""
    for name in todo:
        layer, reference = pruned.get_submodule(name), original.get_submodule(name)
        yield name, ((_io_at(pruned, layer, b.to(device))[0], _io_at(original, reference, b.to(device))[1])
                     for b in batches)


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once the layer of interest has run."""


def _io_at(model: nn.Module, module: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}

    def hook(_, inputs, output):
        seen["io"] = (inputs[0], output)
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        model(images)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen["io"]


def _sample(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, max_rows: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `max_rows` random output positions of `layer` on input `x` with output `y`: the
    input patch of each as a row (columns in the weight's order) and the output there. Positions
    are drawn before any patch is built, so a high-resolution map costs what its rows cost."""
    if isinstance(layer, nn.Linear):
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if len(x) > max_rows:
            pick = torch.randperm(len(x), generator=generator)[:max_rows].to(x.device)
            x, y = x[pick], y[pick]
        return x, y
    n, _, h, w = y.shape
    count = n * h * w
    pick = (torch.randperm(count, generator=generator)[:max_rows] if count > max_rows
            else torch.arange(count)).to(x.device)
    b, oy, ox = pick // (h * w), pick % (h * w) // w, pick % w
    target = y[b, :, oy, ox]
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    x = F.pad(x, _padding(layer), mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    iy = (oy * sh)[:, None] + dh * torch.arange(kh, device=x.device)  # (rows, kh)
    ix = (ox * sw)[:, None] + dw * torch.arange(kw, device=x.device)  # (rows, kw)
    patches = x[b[:, None, None], :, iy[:, :, None], ix[:, None, :]]  # (rows, kh, kw, in)
    return patches.permute(0, 3, 1, 2).reshape(len(pick), -1), target


def _padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """What the conv pads its input with, as F.pad takes it (left, right, top, bottom)."""
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":  # PyTorch puts the odd pixel at the end
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2
    return conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0]


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _kept_weight(module: nn.Module, out_idx: torch.Tensor, in_idx: list[int]) -> torch.Tensor:
    w = module.weight.index_select(0, out_idx).index_select(1, torch.as_tensor(in_idx, device=out_idx.device))
    return w.reshape(len(out_idx), -1)
