"""How long pruning a pretrained net with data takes, by phase, against layers and images.

What `chansearch prune MODEL --macs 50% --data DATA` does: energy scores (one forward pass
with moments hooked on every channel-mixing layer), the global MAC allocation, the cut
(torch-pruning), and the least-squares refit of every layer from the first pruned one on
(one lockstep pass of both nets, compress.pruning.reconstruct). The refit is also run the way it was
before, one forward pass from the input per layer and batch, on the same pruned net and images
(`--baseline-images` of them: it is quadratic in depth), and both refits must give the same
weights. Target: MobileNetV2 at 224 px on 512 images in <= 120 s on 2 cores.

    python benchmarks/bench_prune_speed.py
"""
from __future__ import annotations

import argparse
import copy
import resource
import time
from pathlib import Path

import torch

from common import CIFAR, write_section
from compress.pruning.batchnorm import fold_statistics
from compress.data.specs import sample_labelled
from compress.models import build
from compress.pruning.allocation import config_for_macs
from compress.pruning.importance import group_scores
from compress.pruning.prune import prune_with_map
from compress.pruning.reconstruct import mixes_channels, reconstruct
from compress.pruning.space import ChannelSpace
from compress.pruning.graph import example_input

PRETRAINED = Path(__file__).resolve().parents[2] / "shared" / "pretrained" / "mobilenet_v2_imagenet.pth"
SIZES = {"cpu": dict(images=(128, 256, 512, 1024), baseline=64),
         "gpu": dict(images=(512, 1024, 2048, 4096), baseline=256),
         "quick": dict(images=(32, 64), baseline=16)}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="cpu", help="image counts")
    ap.add_argument("--models", default="mobilenet_v2,mobilenet_v3_large,mobilenet_v3_small,mobilenet_v1")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--macs", type=float, default=0.5, help="MAC target, a share of the model's")
    args = ap.parse_args()
    size = SIZES[args.size]
    rows, checks = [], []
    for name in args.models.split(","):
        # the shared ImageNet weights where they fit; timing does not depend on the weights' values
        pretrained = str(PRETRAINED) if name == "mobilenet_v2" and PRETRAINED.is_file() else None
        model = build(name, num_classes=10, pretrained=pretrained, input_size=args.input_size).eval()
        card = model.card
        images = sample_labelled(f"cifar10:{CIFAR}", True, max(size["images"]), args.input_size, card.mean,
                                 card.std, seed=0)
        space = ChannelSpace.from_model(model, example_input(args.input_size, model))
        layers = sum(mixes_channels(m) for m in model.modules())
        for count in size["images"]:
            batch = (images[0][:count], images[1][:count])
            scores, t_scores = timed(lambda: group_scores(model, space, "energy", batch))
            config, t_alloc = timed(lambda: config_for_macs(space, int(args.macs * space.macs(space.max())), "global",
                                                            scores))
            (pruned, kept), t_cut = timed(lambda: prune_with_map(model, config, space, scores=scores))
            refitted, t_refit = timed(lambda: reconstruct(model, pruned, kept, batch[0]))
            _, t_fold = timed(lambda: fold_statistics(pruned, batch[0].split(64)))
            total = t_scores + t_alloc + t_cut + t_refit + t_fold
            rows.append(f"| {name} | {layers} / {len(refitted)} | {count} | {t_scores:.1f} | {t_alloc:.1f} | "
                        f"{t_cut:.1f} | {t_refit:.1f} | {t_fold:.1f} | {total:.1f} |")
            print(rows[-1], flush=True)
        # the refit's one lockstep pass against a forward pass from the input per layer and batch
        count = size["baseline"]
        batch = (images[0][:count], images[1][:count])
        scores = group_scores(model, space, "energy", batch)
        config = config_for_macs(space, int(args.macs * space.macs(space.max())), "global", scores)
        pruned, kept = prune_with_map(model, config, space, scores=scores)
        lockstep, slow = copy.deepcopy(pruned), copy.deepcopy(pruned)
        fast_layers, t_lockstep = timed(lambda: reconstruct(model, lockstep, kept, batch[0]))
        slow_layers, t_slow = timed(lambda: reconstruct(model, slow, kept, batch[0], lockstep=False))
        same = fast_layers == slow_layers and all(torch.equal(a, b) for a, b in zip(lockstep.state_dict().values(), slow.state_dict().values()))
        checks.append(f"| {name} | {count} | {t_slow:.1f} | {t_lockstep:.1f} | {t_slow / t_lockstep:.1f}x | "
                      f"{'yes' if same else 'NO'} |")
        print(checks[-1], flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    write_section("Pruning speed", "\n".join([
        f"Pruning to {args.macs:.0%} MACs with data at {args.input_size} px, by phase, in seconds (one run each; the "
        "MobileNetV2 with the ImageNet weights of ../shared/pretrained, the others at random init, which times the "
        "same): energy scores, the global allocation, the cut, the least-squares refit, the BN statistics made the "
        "refitted net's (what `chansearch prune --data` runs). Layers: channel-mixing "
        "layers in the model / refitted. The refit holds at most 2 GiB of activations (`cache_mb`); where they "
        f"are larger, fewer images take part in the early layers. Peak memory of the whole run: {peak:.1f} GiB. "
        "Target: MobileNetV2 at 224 px on 512 images in <= 120 s on 2 cores.", "",
        "| model | layers | images | scores s | allocation s | cut s | refit s | BN fold s | total s |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        "The refit as one lockstep pass against the per-layer forward passes it replaced (on the same pruned net "
        "and images; identical weights expected):", "",
        "| model | images | per-layer passes s | lockstep s | speed-up | same weights |",
        "|---|---|---|---|---|---|", *checks]))


if __name__ == "__main__":
    main()
