"""How fast the analytic cost model scores configs, against counting with thop.

Target: 10,000+ configs per second for MobileNetV2 (issue: foundation).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import write_section
from compress import ChannelSpace, build, count
from compress.pruning.prune import prune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--configs", type=int, default=20000, help="configs to score per method")
    ap.add_argument("--thop-configs", type=int, default=5, help="configs pruned and counted by thop")
    ap.add_argument("--models", default="mobilenet_v2,mobilenet_v3_large,mobilenet_v1")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        model = build(name).eval()
        space = ChannelSpace.from_model(model, torch.randn(1, 3, 224, 224))
        rng = np.random.default_rng(0)
        configs = [space.sample(rng) for _ in range(args.configs)]
        t = time.perf_counter()
        for c in configs:
            space.macs(c)
        one = args.configs / (time.perf_counter() - t)
        batch = np.stack([space.vector(c) for c in configs])
        t = time.perf_counter()
        space.macs_many(batch)
        many = args.configs / (time.perf_counter() - t)
        t = time.perf_counter()
        for c in configs[: args.thop_configs]:
            assert count(prune(model, c, space, importance="first"), 224)[0] == space.macs(c)
        thop_rate = args.thop_configs / (time.perf_counter() - t)
        rows.append(f"| {name} | {len(space.groups)} | {one:,.0f} | {many:,.0f} | {thop_rate:.2f} | {one / thop_rate:,.0f}x |")
    write_section("Analytic MACs speed", "\n".join([
        "Configs scored per second at 224x224: `space.macs(config)` one at a time, `space.macs_many` "
        "on a batch, and pruning + thop (the independent count, which the analytic count equals exactly).",
        "Target: 10,000+ configs/s for mobilenet_v2.", "",
        "| model | groups | macs() configs/s | macs_many() configs/s | prune+thop configs/s | speed-up (one at a time) |",
        "|---|---|---|---|---|---|", *rows]))


if __name__ == "__main__":
    main()
