"""Embeddings pruned side by side: the ImageNet MobileNetV2 of ../shared/pretrained with a
128-d embedding head in place of its classifier, trained with the embed task's triplet loss on
CIFAR-10's classes 0-5 as identities, then pruned to 70% and 50% of its MACs by us (energy,
global, refit) and by Torch-Pruning (global group magnitude), each recovered the same way
(`fit` with distillation from the unpruned net, keep-best on held-out training images), several
seeds. Retrieval is scored on identities the net never saw (classes 6-9 of the test split), each
image a query against the others: recall@1, mAP, and fidelity to the unpruned net.

    python benchmarks/bench_embed.py --size cpu --seeds 3       # 96 px, about 50 min on 2 cores
    python benchmarks/bench_embed.py --size gpu --seeds 3       # 224 px, longer schedules
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrained import torch_pruning  # noqa: E402
from common import column, retime, side_by_side_arguments, timed_files, write_section  # noqa: E402

import compress  # noqa: E402
from compress import stages  # noqa: E402
from compress.checkpoint import save_checkpoint  # noqa: E402
from compress.data.source import Loaders  # noqa: E402
from compress.data.specs import ArrayDataset, transforms  # noqa: E402
from compress.settings import PruneSettings, TrainSettings  # noqa: E402
from compress.training.evaluate import evaluate  # noqa: E402
from compress.training.loop import fit  # noqa: E402

SIZES = {  # input px, teacher steps (capped at one epoch), recovery steps, batch, unseen-identity images scored
    "quick": dict(px=32, teacher=20, recover=10, batch=32, gallery=300),
    "cpu": dict(px=96, teacher=400, recover=150, batch=64, gallery=2000),
    "gpu": dict(px=224, teacher=4000, recover=1500, batch=128, gallery=4000),
}
TRAIN_IDS, UNSEEN_IDS = range(0, 6), range(6, 10)
HOLDOUT = 500


def data(root: Path, size: dict, card) -> tuple[Loaders, DataLoader]:
    """Training loaders over the training identities (with held-out images for keep-best) and
    a loader of unseen identities' test images."""
    def arrays(split: str, ids) -> tuple[np.ndarray, np.ndarray]:
        z = np.load(root / f"{split}.npz")
        keep = np.isin(z["y"], list(ids))
        return z["x"][keep], z["y"][keep]
    x, y = arrays("train", TRAIN_IDS)
    order = np.random.default_rng(0).permutation(len(y))
    held, kept = order[:HOLDOUT], order[HOLDOUT:]
    train_tf = transforms(True, size["px"], card.mean, card.std, 32)
    eval_tf = transforms(False, size["px"], card.mean, card.std, 32)
    train = DataLoader(ArrayDataset(x[kept], y[kept], train_tf), size["batch"], shuffle=True, drop_last=True)
    holdout = DataLoader(ArrayDataset(x[held], y[held], eval_tf), 100)
    gx, gy = arrays("test", UNSEEN_IDS)
    pick = np.sort(np.random.default_rng(1).permutation(len(gy))[:size["gallery"]])
    gallery = DataLoader(ArrayDataset(gx[pick], gy[pick], eval_tf), 100)
    return Loaders(train, None, holdout), gallery


def train_teacher(pretrained: str, size: dict, root: Path, cells: Path) -> torch.nn.Module:
    path = cells / "teacher.pt"
    if path.exists():
        return compress.load(path)
    model = compress.build("mobilenet_v2", num_classes=128, pretrained=pretrained, input_size=size["px"], task="embed")
    loaders, _ = data(root, size, model.card)
    settings = TrainSettings(epochs=1, steps_per_epoch=size["teacher"], lr=0.01, warmup_epochs=0.05, keep_best=False,
                             val_images=0, channels_last=False, weight_decay=4e-5)
    model = fit(model, loaders, settings, cells / "teacher_run", validate=False)
    save_checkpoint(path, model)
    return model


def tag(cell: dict) -> str:
    return f"{cell['method']}_{int(cell['target'] * 100)}_{cell['seed']}"


def run_cell(cells: Path, method: str, target: float, seed: int, teacher, root: Path, size: dict) -> dict:
    name = tag({"method": method, "target": target, "seed": seed})
    path = cells / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    loaders, gallery = data(root, size, teacher.card)
    began = time.perf_counter()
    if method == "unpruned":
        net, seconds = teacher, 0.0
    else:
        torch.manual_seed(seed)
        pruned = (stages.prune(teacher, PruneSettings(), macs=f"{target:.0%}", data=loaders).model if method == "ours"
                  else torch_pruning(teacher, target, round_to=8))
        settings = TrainSettings(epochs=1, steps_per_epoch=size["recover"], lr=0.01, warmup_epochs=0.05, kd_weight=0.7,
                                 keep_best=True, eval_every=50, val_images=0, channels_last=False, seed=seed,
                                 weight_decay=4e-5)
        net = fit(pruned, loaders, settings, cells / f"run_{name}", teacher=teacher,
                  validate=False, quiet=True)
        seconds = time.perf_counter() - began
    scores = evaluate(net, gallery, teacher=None if net is teacher else teacher)
    macs = compress.count(net, size["px"])[0] / compress.count(teacher, size["px"])[0]
    cell = {"method": method, "target": target, "seed": seed, "macs": macs, "seconds": round(seconds, 1),
            **{k: scores.get(k) for k in ("recall1", "map", "fidelity_recall1", "fidelity_cosine")}}
    if method != "unpruned":
        folder = cells / f"files_{name}"
        folder.mkdir(exist_ok=True)
        timed = timed_files(net, teacher, f"cifar10:{root}", size["px"], folder)
        cell.update(timed, int8_cosine=timed.pop("int8_parity")["top1_agreement"])
    path.write_text(json.dumps(cell))
    return cell


def table(cells: list[dict]) -> str:
    rows = ["| method | MACs target | MACs (x unpruned) | recall@1 % | mAP % | fidelity: same nearest % | fidelity: "
            "mean cosine | float TFLite (x unpruned) | int8 TFLite (x unpruned int8) | int8 gate: mean cosine vs float "
            "| seeds | recovery s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(c["method"], c["target"]) for c in cells}, key=lambda k: (-k[1], k[0] != "unpruned", k[0]))
    for method, target in keys:
        same = [c for c in cells if (c["method"], c["target"]) == (method, target)]

        def stat(key: str, scale: float = 100, digits: int = 1) -> str:
            return column(same, key, scale, digits)
        rows.append(f"| {method} | {'-' if method == 'unpruned' else f'{target:.0%}'} | {same[0]['macs']:.3f} | "
                    f"{stat('recall1')} | {stat('map')} | {stat('fidelity_recall1')} | {stat('fidelity_cosine', 1, 3)} "
                    f"| {stat('float_x', 1, 2)} | {stat('int8_x', 1, 2)} | {stat('int8_cosine', 1, 3)} | {len(same)} "
                    f"| {np.mean([c['seconds'] for c in same]):.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    side_by_side_arguments(ap, SIZES, "runs/bench_embed")
    ap.add_argument("--data", default="../shared/data/cifar10", help="folder with CIFAR-10's train.npz and test.npz")
    ap.add_argument("--pretrained", default="../shared/pretrained/mobilenet_v2_imagenet.pth")
    args = ap.parse_args()
    size, root = SIZES[args.size], Path(args.data)
    cells = Path(args.cells) / args.size
    cells.mkdir(parents=True, exist_ok=True)
    teacher = train_teacher(args.pretrained, size, root, cells)
    done = [run_cell(cells, "unpruned", 1.0, 0, teacher, root, size)]
    for target in (float(t) for t in args.targets.split(",")):
        for seed in range(args.seeds):
            for method in ("ours", "torch-pruning"):
                done.append(run_cell(cells, method, target, seed, teacher, root, size))
                print(json.dumps(done[-1]), flush=True)
    if args.retime:
        retime(cells, done, tag)
    steps = min(size["teacher"], len(data(root, size, teacher.card)[0].train))  # one epoch at most
    note = (f"ImageNet MobileNetV2 (`{args.pretrained}`) with a 128-d embedding head, {size['px']} px, trained "
            f"{steps} steps of {size['batch']} with the embed task's triplet loss on CIFAR-10 classes 0-5 as "
            f"identities (`{args.data}`). Pruned by us (`stages.prune`: energy, global, refit on the training images) "
            "or by Torch-Pruning (MetaPruner, group magnitude, global, round_to 8, its ratio bisected to the MAC "
            f"target), then recovered alike: {size['recover']} steps at lr 0.01, distilled from the unpruned net "
            f"(1 - cosine, weight 0.7), keep-best on {HOLDOUT} held-out training images. Scored on {size['gallery']} "
            "test images of classes 6-9, identities no net was trained on, each a query against the others. "
            "Fidelity: the share of queries whose nearest neighbour is the unpruned net's, and the mean cosine "
            "similarity to its embeddings. Latency: LiteRT, 1 thread, the pruned file's median over the unpruned "
            "file's of the same kind, 3 interleaved rounds; the int8 files calibrated on 64 CIFAR-10 training images "
            "and gated by their mean cosine similarity to the float model (floor 0.98). Mean ± std over seeds (the "
            "seed moves the recovery).")
    write_section(f"Embeddings: pruned side by side ({args.size})", note + "\n\n" + table(done))


if __name__ == "__main__":
    main()
