"""The tables of bench_pretrained.py: per target and method, the top-1 before and after each
recovery (mean ± std over seeds at the lr the first seed did best with), sharpness, latency and
pruning time; and what serving a family of targets costs each method."""
from __future__ import annotations

import statistics

METHODS = ("compress", "compress-norefit", "compress-uniform", "compress-l1-global", "compress-slimmable",
           "compress-slimmable-teacher", "compress-pruningnet-teacher", "tp", "tp-r8", "fastnas")


def after_key(protocol: str, lr: float) -> str:
    return f"after_{protocol}@{lr:g}"


def best(group: list[dict], protocol: str) -> str:
    """The protocol's mean ± std over seeds at the lr the first seed did best with, and that lr."""
    first = min(group, key=lambda c: c["seed"])
    tried = {float(k.split("@")[1]): v for k, v in first.items() if k.startswith(f"after_{protocol}@")}
    if not tried:
        return "-"
    lr = max(tried, key=tried.get)
    kept = [c[f"kept_step_{protocol}@{lr:g}"] for c in group if f"kept_step_{protocol}@{lr:g}" in c]
    starts = f", start kept {sum(step == 0 for step in kept)}/{len(kept)}" if kept else ""
    return f"{mean_std([c[after_key(protocol, lr)] for c in group if after_key(protocol, lr) in c])} (lr {lr:g}{starts})"


def pruning_time(group: list[dict]) -> str:
    """The first seed's: the later ones reuse its pruned net."""
    first = min(group, key=lambda c: c["seed"])
    return f"{first['pruning_s']:.0f} s" if "pruning_s" in first else "-"


def tried(cells: list[dict]) -> list[float]:
    """Every recovery lr the cells ran, largest first."""
    return sorted({float(k.split("@")[1]) for c in cells for k in c if k.startswith("after_")}, reverse=True)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1%}"
    return f"{statistics.mean(values):.1%} ± {statistics.stdev(values):.1%}"


def table(cells: list[dict], teacher_top1: float, teacher_macs: int) -> str:
    rows = ["| MAC target | method | MACs kept | params | top-1 before recovery | sharpness | after `finetune` "
            "| after plain loop | seeds | TFLite latency vs teacher | pruning time |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| - | teacher (unpruned) | 100% | - | {teacher_top1:.1%} | 1.0x | - | - | - | 1.00x | - |"]
    for target in sorted({c["target"] for c in cells}, reverse=True):
        for method in METHODS:
            group = [c for c in cells if c["target"] == target and c["method"] == method]
            if not group:
                continue
            pick = lambda k: [c[k] for c in group if k in c]  # noqa: E731
            sharp = f"{statistics.mean(pick('sharpness')):.1f}x" if pick("sharpness") else "-"
            rows.append(f"| {target:.0%} | {label(group[0])} | {group[0]['macs'] / teacher_macs:.1%} | "
                        f"{statistics.mean(pick('params')) / 1e6:.2f}M | {mean_std(pick('before'))} | {sharp} | "
                        f"{best(group, 'finetune')} | {best(group, 'plain')} | {len(group)} | "
                        f"{statistics.median(pick('latency')):.2f}x | {pruning_time(group)} |")
    return "\n".join(rows)


def label(cell: dict) -> str:
    """The method, and for a supernet row how long its supernet trained and at what size its
    search scored (the two settings that trade its cost against its choice)."""
    if "supernet_steps" not in cell:
        return cell["method"]
    scored = f", scored at {cell['score_size']} px" if cell.get("score_size") else ""
    return f"{cell['method']} (supernet {cell['supernet_steps']} steps{scored})"


def family(cells: list[dict]) -> str:
    """What serving every target costs each method: its pruning times summed over the targets
    (a supernet method pays for its supernet once, in the first target it ran), beside the
    top-1 each target recovers to."""
    rows = ["| method | targets | pruning wall time, all targets | top-1 after `finetune` per target |",
            "|---|---|---|---|"]
    for method in METHODS:
        firsts = sorted((c for c in cells if c["method"] == method and c["seed"] == 0 and "pruning_s" in c),
                        key=lambda c: -c["target"])
        if len(firsts) < 2:
            continue
        after = ", ".join(f"{c['target']:.0%}: {best([c], 'finetune').split(' (')[0]}" for c in firsts)
        rows.append(f"| {method} | {len(firsts)} | {sum(c['pruning_s'] for c in firsts):.0f} s | {after} |")
    return "\n".join(rows) if len(rows) > 2 else ""
