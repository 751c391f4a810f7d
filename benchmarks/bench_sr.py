"""Super-resolution pruned side by side: an ESPCN (benchmarks/espcn.py, the kind of net a user
brings as their own file) trained for x2 and x3 upscaling on CIFAR-10 pairs (`sr:SPEC:xN`:
the target a real image crop, the input its bicubic downscaling), then pruned to 70% and 50%
of its MACs by us (energy, global, refit) and by Torch-Pruning (global group magnitude, the
conv feeding the PixelShuffle left whole), each recovered the same way (`fit`: L1 plus L1
distillation from the unpruned net, the last state kept), several seeds.
Scored on CIFAR-10 test pairs: PSNR and SSIM against the high-resolution image, fidelity (PSNR
against the unpruned net's output); float and int8 TFLite files at a 128-px input, the int8 one
gated by its SSIM against the float model, timed beside the unpruned file.

    python benchmarks/bench_sr.py --size cpu --seeds 3       # about 30 min on 2 cores
    python benchmarks/bench_sr.py --size gpu --seeds 3       # longer schedules
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import column, retime, side_by_side_arguments, timed_files, write_section  # noqa: E402
from espcn import ESPCN  # noqa: E402

import compress  # noqa: E402
from compress import stages  # noqa: E402
from compress.checkpoint import save_checkpoint  # noqa: E402
from compress.data.specs import eval_set, loader, random_subset  # noqa: E402
from compress.settings import DataSettings, PruneSettings, TrainSettings  # noqa: E402
from compress.training.evaluate import evaluate  # noqa: E402
from compress.training.loop import fit  # noqa: E402
from compress.training.restoration import psnr  # noqa: E402

SIZES = {  # teacher steps, recovery steps, batch, test pairs scored, timing input px
    "quick": dict(teacher=30, recover=10, batch=32, test=200, timed=32),
    "cpu": dict(teacher=3000, recover=300, batch=64, test=2000, timed=128),
    "gpu": dict(teacher=20000, recover=2000, batch=128, test=10000, timed=256),
}
INPUT = {2: 16, 3: 10}  # low-resolution input px: targets of 32 and 30 px, cut from 32-px images without upscaling
HOLDOUT = 500


def spec(root: Path, scale: int) -> str:
    return f"sr:cifar10:{root}:x{scale}"


EPOCH = 300  # steps: shorter than one pass over CIFAR-10's training pairs, so `steps` are all run


def settings(steps: int, lr: float, seed: int, **extra) -> TrainSettings:
    return TrainSettings(epochs=math.ceil(steps / EPOCH), steps_per_epoch=min(steps, EPOCH), lr=lr, optimizer="adamw",
                         weight_decay=0.0, warmup_epochs=0.02, holdout=HOLDOUT, val_images=HOLDOUT, eval_every=100,
                         channels_last=False, seed=seed, **extra)


def train_teacher(root: Path, scale: int, size: dict, cells: Path) -> torch.nn.Module:
    path = cells / f"teacher_x{scale}.pt"
    if path.exists():
        return compress.load(path, model=ESPCN(scale))
    torch.manual_seed(0)
    model = compress.describe(ESPCN(scale), INPUT[scale], task="restore", mean=(0, 0, 0), std=(1, 1, 1))
    data = DataSettings(spec=spec(root, scale), batch_size=size["batch"], workers=0)
    model = fit(model, data, settings(size["teacher"], 0.003, 0, keep_best=False), cells / f"teacher_x{scale}_run",
                validate=False)
    save_checkpoint(path, model)
    return model


def torch_pruning(teacher: torch.nn.Module, target: float) -> torch.nn.Module:
    """Torch-Pruning's documented path (MetaPruner, group magnitude, global), the output conv
    ignored as its classifier would be; the ratio bisected until the MACs are at most the target."""
    import torch_pruning as tp
    example = torch.randn(1, 3, teacher.card.input_size, teacher.card.input_size)
    full = tp.utils.count_ops_and_params(teacher, example)[0]
    lo, hi, best = 0.0, 1.0, None
    for _ in range(12):
        mid = (lo + hi) / 2
        model = copy.deepcopy(teacher).eval()
        last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=mid,
                             global_pruning=True, ignored_layers=[last]).step()
        if tp.utils.count_ops_and_params(model, example)[0] <= target * full:
            hi, best = mid, model
        else:
            lo = mid
    return best


def tag(cell: dict) -> str:
    return f"x{cell['scale']}_{cell['method']}_{int(cell['target'] * 100)}_{cell['seed']}"


def run_cell(cells: Path, scale: int, method: str, target: float, seed: int, teacher, root: Path,
             size: dict) -> dict:
    name = tag({"scale": scale, "method": method, "target": target, "seed": seed})
    path = cells / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    data = spec(root, scale)
    test = loader(random_subset(eval_set(data, INPUT[scale], (0, 0, 0), (1, 1, 1), None), size["test"], seed=0), 200)
    began = time.perf_counter()
    if method == "unpruned":
        net, seconds = teacher, 0.0
    else:
        torch.manual_seed(seed)
        pruned = (stages.prune(teacher, PruneSettings(), macs=f"{target:.0%}", data=data).model if method == "ours"
                  else torch_pruning(teacher, target))
        net = fit(pruned, DataSettings(spec=data, batch_size=size["batch"], workers=0),
                  settings(size["recover"], 0.0005, seed, kd_weight=0.5), cells / f"run_{name}", teacher=teacher,
                  validate=False, quiet=True)
        seconds = time.perf_counter() - began
    scores = evaluate(net, test, teacher=None if net is teacher else teacher)
    macs = compress.count(net, INPUT[scale])[0] / compress.count(teacher, INPUT[scale])[0]
    cell = {"scale": scale, "method": method, "target": target, "seed": seed, "macs": macs,
            "seconds": round(seconds, 1), **{k: scores.get(k) for k in ("psnr", "ssim", "fidelity_psnr")}}
    if method == "unpruned":  # the floor an SR net must clear: bicubic upscaling of the same inputs
        cell["bicubic_psnr"] = float(torch.cat([psnr(torch.nn.functional.interpolate(
            low, scale_factor=scale, mode="bicubic"), high) for low, high in test]).mean())
    elif seed == 0:  # the seed moves the recovery, not the architecture: one set of files per cut
        folder = cells / f"files_{name}"
        folder.mkdir(exist_ok=True)
        timed = timed_files(net, teacher, data, size["timed"], folder)
        gate = timed.pop("int8_parity")
        cell.update(timed, int8_ssim=gate["top1_agreement"], int8_psnr_db=gate["psnr_db"])
    path.write_text(json.dumps(cell))
    return cell


def table(cells: list[dict]) -> str:
    rows = ["| scale | method | MACs target | MACs (x unpruned) | PSNR dB | SSIM | fidelity: PSNR vs unpruned dB | "
            "float TFLite (x unpruned) | int8 TFLite (x unpruned int8) | int8 gate: SSIM vs float | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(c["scale"], c["method"], c["target"]) for c in cells},
                  key=lambda k: (k[0], -k[2], k[1] != "unpruned", k[1]))
    for scale, method, target in keys:
        same = [c for c in cells if (c["scale"], c["method"], c["target"]) == (scale, method, target)]

        def stat(key: str, scale_: float = 1, digits: int = 2) -> str:
            return column(same, key, scale_, digits)
        rows.append(f"| x{scale} | {method} | {'-' if method == 'unpruned' else f'{target:.0%}'} | "
                    f"{same[0]['macs']:.3f} | {stat('psnr')} | {stat('ssim', 1, 3)} | {stat('fidelity_psnr')} | "
                    f"{stat('float_x')} | {stat('int8_x')} | {stat('int8_ssim', 1, 3)} | {len(same)} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    side_by_side_arguments(ap, SIZES, "runs/bench_sr")
    ap.add_argument("--scales", default="2,3", help="upscaling factors")
    ap.add_argument("--data", default="../shared/data/cifar10", help="a CIFAR-10 folder (train.npz/test.npz or "
                                                                      "the standard batches)")
    args = ap.parse_args()
    size, root = SIZES[args.size], Path(args.data)
    cells = Path(args.cells) / args.size
    cells.mkdir(parents=True, exist_ok=True)
    done = []
    for scale in (int(s) for s in args.scales.split(",")):
        teacher = train_teacher(root, scale, size, cells)
        done.append(run_cell(cells, scale, "unpruned", 1.0, 0, teacher, root, size))
        for target in (float(t) for t in args.targets.split(",")):
            for seed in range(args.seeds):
                for method in ("ours", "torch-pruning"):
                    done.append(run_cell(cells, scale, method, target, seed, teacher, root, size))
                    print(json.dumps(done[-1]), flush=True)
    if args.retime:
        retime(cells, done, tag)
    unpruned = {c["scale"]: c for c in done if c["method"] == "unpruned"}
    note = (f"ESPCN (`benchmarks/espcn.py`, 64-32 channels, tanh) trained {size['teacher']} steps of {size['batch']} "
            f"(AdamW lr 3e-3, L1) per scale on CIFAR-10 pairs (`{args.data}`): x2 maps 16 px to 32 px, x3 10 px to "
            "30 px (bicubic downscaling of real crops). Pruned by us (`stages.prune`: energy, global, refit on "
            "training pairs) or by Torch-Pruning (MetaPruner, group magnitude, global, the conv feeding the "
            "PixelShuffle ignored, its ratio bisected to the MAC target), then recovered alike: "
            f"{size['recover']} steps at lr 5e-4, L1 plus L1 distillation from the unpruned net (weight 0.5), "
            f"the last state kept ({HOLDOUT} training pairs held out of training). Scored on {size['test']} CIFAR-10 "
            "test pairs. "
            f"Latency (seed 0's files: the seed moves the recovery, not the cut): LiteRT, 1 thread, files at a "
            f"{size['timed']}-px input, the pruned file's median over the "
            "unpruned file's of the same kind, timed in 3 interleaved rounds; the int8 files calibrated on 64 "
            "training pairs (upscaled to the timing size) and gated by their SSIM against the float model "
            "(floor 0.98). Unpruned PSNR: " + ", ".join(f"x{s} {c['psnr']:.2f} dB (bicubic upscaling: "
                                                     f"{c['bicubic_psnr']:.2f} dB)" for s, c in unpruned.items())
            + ". Mean ± std over seeds (the seed moves the recovery).")
    write_section(f"Super-resolution: pruned side by side ({args.size})", note + "\n\n" + table(done))


if __name__ == "__main__":
    main()
