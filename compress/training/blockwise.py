"""Block-wise reconstruction: the recovery that gains on a few hundred images.

On a few hundred images an end-to-end fine-tune of a pruned, refitted net moves it away from
the unpruned one on new images: every layer moves at once on a noisy gradient (RESULTS,
"Recovery with few images"). Here each block of the pruned net (the largest modules holding
at most MAX_LAYERS conv/linear layers that are not plain containers: an inverted-residual or
bottleneck block, a stem, a classifier) is trained alone, in the order a forward pass reaches
them, on its own input from the pruned net before it, to reproduce the unpruned block's output
on the channels it kept, as BRECQ and PRACTISE do. It is the least-squares refit's nonlinear
extension: the depthwise convs, BN and activations take part, and the error every earlier
block left is absorbed.

A block's inputs and the teacher's outputs are computed once, so a step costs one block's
forward and backward. Where one block's output is the next block's input (a chain of blocks)
the cached output is passed on; elsewhere both nets run from the images up to the block. A
tenth of the images is held out: a block keeps its new weights only when its error on those
went down. Channels are matched as feature distillation matches them (by correlation), so no
channel map travels with the checkpoint.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from compress.pruning.batchnorm import fold_statistics
from compress.settings import TrainSettings
from compress.training.features import matched_channels
from compress.units import duration

MAX_LAYERS = 6  # a block: the largest module with at most this many conv/linear layers
HOLDOUT_SHARE = 0.1  # of the images, held out to check each block's gain
CACHE_SHARE = 3  # a block's cached tensors: the student's input and output, the teacher's output


@dataclass
class Block:
    name: str
    chained: bool  # its input is the previous block's output
    bytes_per_image: int  # its input and output, one image


class _Reached(Exception):
    """Ends a forward pass once the wanted activation is captured."""


def find_blocks(student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> list[Block]:
    """The blocks to reconstruct, in the order a forward pass reaches them: modules the teacher
    has by the same name and type, called once with one tensor and returning one, whose output
    the teacher's matches in every dimension but the channels (which it has at least as many of)."""
    theirs = dict(teacher.named_modules())
    names = [n for n in _largest_with_few_layers(student, "") if n in theirs
             and type(theirs[n]) is type(student.get_submodule(n))]
    ours, theirs_out = _calls(student, names, example), _calls(teacher, names, example)
    order = [n for n in ours if n in theirs_out and _comparable(ours[n][1], theirs_out[n][1])]
    blocks, previous = [], None
    for name in order:
        inputs, output = ours[name]
        blocks.append(Block(name, previous is not None and inputs is ours[previous][1],
                            (inputs[0].numel() + output[0].numel()) * output.element_size()))
        previous = name
    return blocks


@torch.no_grad()
def reconstruct_blocks(student: nn.Module, teacher: nn.Module, images: torch.Tensor, steps: int = 200,
                       lr: float = 1e-3, batch_size: int = 32, seed: int = 0, cache_mb: int = 4096,
                       progress: bool = False) -> list[dict]:
    """Train each block of `student` (a pruned net) towards `teacher`'s (the unpruned one) on
    `images`, `steps` Adam steps a block at `lr` (cosine), then set every BN's statistics to
    the reconstructed net's own (its function unchanged), so a fine-tune's train-mode BN starts
    where the net is. `cache_mb` bounds the activations held at once (fewer images where they
    are large). Returns each block's relative error on the held-out images before and after,
    and whether it kept its new weights."""
    was = student.training
    student.eval()
    teacher.eval()
    blocks = find_blocks(student, teacher, images[:2])
    if not blocks:
        return []
    fits = max(4, (cache_mb << 20) // (CACHE_SHARE * max(b.bytes_per_image for b in blocks)))
    images = images[:fits]
    held = max(1, round(len(images) * HOLDOUT_SHARE))
    generator = torch.Generator().manual_seed(seed)
    records, ours, theirs = [], None, None
    bar = tqdm(total=len(blocks) * steps, desc="block-wise reconstruction", unit="step", disable=not progress)
    for block in blocks:
        if not block.chained or ours is None:
            ours, theirs = _captured(student, block.name, images), _captured(teacher, block.name, images)
        mine, target_block = student.get_submodule(block.name), teacher.get_submodule(block.name)
        full = _batched(target_block, theirs)
        target = full[:, matched_channels(_batched(mine, ours[:64]), full[:64])]
        records.append({"block": block.name, **_fit(mine, ours, target, held, steps, lr, batch_size, generator)})
        bar.update(steps)
        bar.set_postfix(block=block.name, error=f"{records[-1]['after']:.4f}")
        ours, theirs = _batched(mine, ours), full
    bar.close()
    fold_statistics(student, images.split(64), images.device)
    student.train(was)
    return records


def _fit(block: nn.Module, inputs: torch.Tensor, target: torch.Tensor, held: int, steps: int, lr: float,
         batch_size: int, generator: torch.Generator) -> dict:
    """`steps` steps of one block (BN statistics as they are) on the images after the first
    `held`, kept only when the error on those `held` went down."""
    scale = target[:held].pow(2).mean().clamp_min(1e-12)
    before = (F.mse_loss(block(inputs[:held]), target[:held]) / scale).item()
    params = [p for p in block.parameters() if p.requires_grad]
    if not params or len(inputs) <= held or before < 1e-8:  # e.g. a stem that lost no input channel
        return {"before": before, "after": before, "kept": False}
    start = copy.deepcopy(block.state_dict())
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        pick = torch.randint(held, len(inputs), (batch_size,), generator=generator).to(inputs.device)
        with torch.enable_grad():
            loss = F.mse_loss(block(inputs[pick]), target[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        schedule.step()
    after = (F.mse_loss(block(inputs[:held]), target[:held]) / scale).item()
    if after < before:
        return {"before": before, "after": after, "kept": True}
    block.load_state_dict(start)
    return {"before": before, "after": before, "kept": False}


def _largest_with_few_layers(module: nn.Module, prefix: str) -> list[str]:
    """A plain container is never a block: a ResNet stage is a Sequential of residual blocks, and
    one block at a time is the measured granularity (a subclass, such as torchvision's conv + BN
    + activation, is)."""
    if not any(p.requires_grad for p in module.parameters()):
        return []
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())
    if prefix and layers <= MAX_LAYERS and type(module) not in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        return [prefix]
    return [name for child, sub in module.named_children()
            for name in _largest_with_few_layers(sub, f"{prefix}.{child}" if prefix else child)]


def _calls(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple]:
    """name -> (input, output) of the modules among `names` that one forward pass calls once,
    with one tensor and returning one, in the order it reaches them."""
    seen: dict[str, list] = {}

    def pre(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, []).append(args[0] if len(args) == 1 and not kwargs
                                             and isinstance(args[0], torch.Tensor) else None)
        return hook

    def post(name):
        def hook(module, args, output):
            seen[name].append(output if isinstance(output, torch.Tensor) else None)
        return hook

    handles = []
    for name in names:
        module = model.get_submodule(name)
        handles += [module.register_forward_pre_hook(pre(name), with_kwargs=True),
                    module.register_forward_hook(post(name))]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return {n: (c[0], c[1]) for n, c in seen.items() if len(c) == 2 and c[0] is not None and c[1] is not None}


def _comparable(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return (ours.dim() == theirs.dim() >= 2 and ours.shape[2:] == theirs.shape[2:]
            and ours.shape[1] <= theirs.shape[1])


def _captured(model: nn.Module, name: str, images: torch.Tensor) -> torch.Tensor:
    """The input `model`'s module `name` receives on each image (the pass stops there)."""
    parts = []

    def hook(module, args):
        parts.append(args[0])
        raise _Reached

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        for batch in images.split(64):
            try:
                model(batch)
            except _Reached:
                pass
    finally:
        handle.remove()
    return torch.cat(parts)


def _batched(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([module(x) for x in inputs.split(64)])


def reconstruct_before_training(model: nn.Module, teacher: nn.Module, loader, cfg: TrainSettings,
                                device: torch.device, quiet: bool) -> list[dict]:
    """`reconstruct_blocks` (`cfg.block_steps` a block) on the first `cfg.block_images` images
    `loader` yields (augmented as training sees them), with a line saying what it did."""
    parts, count = [], 0
    for images, _ in loader:
        parts.append(images)
        count += len(images)
        if count >= cfg.block_images:
            break
    images = torch.cat(parts)[:cfg.block_images].to(device)
    if cfg.channels_last:
        images = images.to(memory_format=torch.channels_last)
    began = time.perf_counter()
    records = reconstruct_blocks(model, teacher, images, cfg.block_steps, seed=cfg.seed, progress=not quiet)
    if records and not quiet:
        kept = [r for r in records if r["kept"]]
        change = sum(r["after"] / r["before"] - 1 for r in kept if r["before"]) / max(len(kept), 1)
        print(f"block-wise reconstruction: {len(kept)} of {len(records)} blocks closer to the teacher's on held-out "
              f"images (error {change:+.0%} on average), {duration(time.perf_counter() - began)}", flush=True)
    return records
