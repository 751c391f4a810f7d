"""A cheaper one-shot search: configs scored at a smaller input size (`search --score-size`)
against the same configs scored at the model's own, on one trained supernet.

For each input size, every config is BN-recalibrated and scored on the same held-out images
(the supernet run's), timed. Reported per size: seconds per config and the speed-up over the
full size; Kendall's tau between its top-1 ranking and the full size's; and what the choice
would lose, at each MAC budget: the full-size top-1 of the config the smaller size ranks best
under that budget, against the best config's. A tau near 1 and no loss at the budgets mean
the speed-up does not change what the search picks.

    python benchmarks/bench_search_cost.py --run runs/bench224/slimmable --sizes 224,160,128,96
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy.stats import kendalltau

from common import write_section
from compress.training.evaluate import evaluate
from compress.settings import HeldOutScoring
from compress.stages import held_out, supernet_file
from compress.supernet import load_supernet, recalibrate_bn

SIZES = {"cpu": dict(configs=24, recal=256, eval=256), "gpu": dict(configs=100, recal=2000, eval=2000),
         "quick": dict(configs=6, recal=16, eval=16)}


def configs_spread(space, count: int, seed: int) -> list[dict]:
    """Random configs spread over the MAC range: each a uniform width with every group moved
    at random around it, so budgets from the min to the max config all have candidates."""
    rng = np.random.default_rng(seed)
    out = []
    for ratio in np.sqrt(np.linspace(0.15, 1.0, count)):  # MACs grow about as the width squared
        config = {}
        for g in space.groups:
            aim = ratio * g.max * rng.uniform(0.8, 1.2)
            config[g.name] = int(min(g.widths, key=lambda w: abs(w - aim)))
        out.append(space.validate(config).to_dict())
    return out


def score(supernet, configs: list[dict], held) -> tuple[list[float], float]:
    """Each config's held-out top-1 and the mean seconds per config (recalibration included)."""
    top1, start = [], time.perf_counter()
    for config in configs:
        recalibrate_bn(supernet, config, held.batches("recal"))
        top1.append(evaluate(supernet, held.batches("eval"), distributed_sum=False)["top1"])
    return top1, (time.perf_counter() - start) / len(configs)


def regret(full: list[float], small: list[float], macs: list[int], budget: int) -> float:
    """Full-size top-1 lost by picking, under `budget`, the config `small` ranks best."""
    within = [i for i, m in enumerate(macs) if m <= budget]
    return max(full[i] for i in within) - full[max(within, key=lambda i: small[i])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained supernet's run folder (chansearch supernet --out)")
    ap.add_argument("--sizes", default="224,160,128,96", help="input sizes, the model's own first")
    ap.add_argument("--size", choices=SIZES, default="cpu", help="configs and held-out images")
    ap.add_argument("--budgets", default="70%,50%,30%", help="MAC budgets to report the choice's loss at")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    p = SIZES[args.size]
    torch.set_grad_enabled(False)
    supernet, record = load_supernet(supernet_file(args.run))
    space = supernet.space
    configs = configs_spread(space, p["configs"], args.seed)
    macs = [space.macs(c) for c in configs]
    full_macs = space.macs(space.max())
    budgets = [(b, int(float(b.strip("%")) / 100 * full_macs)) for b in args.budgets.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    scores, seconds = {}, {}
    for size in sizes:
        scoring = HeldOutScoring(recal_images=p["recal"], eval_images=p["eval"], score_size=size)
        scores[size], seconds[size] = score(supernet, configs, held_out(supernet, record["holdout"], scoring))
        print(f"{size} px: {seconds[size]:.2f} s per config, top-1 {min(scores[size]):.1%}-{max(scores[size]):.1%}",
              flush=True)
    base = sizes[0]
    rows = ["| input size | s per config | speed-up | Kendall tau vs " + f"{base} px | "
            + " | ".join(f"top-1 lost at {b}" for b, _ in budgets) + " |",
            "|---|---|---|---|" + "---|" * len(budgets)]
    for size in sizes:
        tau = kendalltau(scores[base], scores[size]).statistic
        lost = [regret(scores[base], scores[size], macs, limit) for _, limit in budgets]
        rows.append(f"| {size} | {seconds[size]:.2f} | {seconds[base] / seconds[size]:.1f}x | {tau:.2f} | "
                    + " | ".join(f"{x:.1%}" for x in lost) + " |")
    spread = f"{min(macs) / full_macs:.0%}-{max(macs) / full_macs:.0%}"
    write_section(f"A cheaper search: scoring at a smaller input size ({base} px model)", "\n".join([
        f"Supernet `{args.run}` ({record['method']}). {len(configs)} configs spread over {spread} of the MACs, each "
        f"BN-recalibrated on {p['recal']} and scored on {p['eval']} of the run's held-out images at every input "
        f"size (the search's `--score-size`), one process, {torch.get_num_threads()} threads. Kendall tau: the "
        f"rank correlation of each size's top-1 with the {base}-px one over all configs. Top-1 lost at a budget: "
        f"the {base}-px top-1 of the config a size ranks best under that budget, below the best config's "
        "(0.0% = the same choice or an equal one). Median top-1 at "
        f"{base} px: {statistics.median(scores[base]):.1%}.", "", "\n".join(rows)]))


if __name__ == "__main__":
    main()
