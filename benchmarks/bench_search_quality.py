"""Channel search on CIFAR-10 against the uniform-width baselines (bench_reference.py).

mobilenet_v2_cifar: train a supernet (slimmable or PruningNet), search configs at MAC
targets (greedy for slimmable; evolution and random with the same number of evaluations for
PruningNet), extract each, fine-tune it, and also retrain its architecture from scratch (as
MetaPruning and AutoSlim do) with the uniform-width baselines' schedule; report test top-1
next to those baselines. Every stage is a real `chansearch` command, printed and run
as a subprocess; a stage whose output exists is skipped, so an interrupted run resumes.

`--size cpu` fits a few hours on 2 CPU cores (the training budget matches bench_reference's
5 epochs: supernet epochs + fine-tune epochs); `--size gpu` is the full-scale schedule.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from common import CIFAR, write_section

SIZES = {
    "cpu": dict(supernet_epochs=3, finetune_epochs=2, batch=128, lr=0.1, holdout=5000, recal=128, evals=256,
                greedy_step=0.1, population=16, parents=4, mutations=8, crossovers=8, iterations=5),
    "gpu": dict(supernet_epochs=150, finetune_epochs=50, batch=256, lr=0.2, holdout=5000, recal=2000, evals=5000,
                greedy_step=0.05, population=50, parents=10, mutations=25, crossovers=25, iterations=20),
    "quick": dict(supernet_epochs=1, finetune_epochs=1, batch=64, lr=0.05, holdout=500, recal=32, evals=64,
                  greedy_step=0.25, population=4, parents=2, mutations=2, crossovers=2, iterations=1, steps=5),
}
TARGETS = "50%,30%"


def chansearch(*args: str) -> str:
    cmd = [sys.executable, "-m", "compress", *map(str, args)]
    print("$ chansearch " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    print(out.stdout, end="", flush=True)
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="cpu")
    ap.add_argument("--method", choices=["slimmable", "pruningnet"], required=True)
    ap.add_argument("--data", default=f"cifar10:{CIFAR}")
    ap.add_argument("--baselines", default="runs/reference", help="bench_reference.py's output folder")
    ap.add_argument("--out", default="runs/search_quality")
    args = ap.parse_args()
    p = SIZES[args.size]
    gpu = torch.cuda.is_available()
    common = ["--batch-size", p["batch"], "--workers", 2, "--quiet", "--channels-last"]
    if gpu:
        common += ["--amp", "bf16"]
    if "steps" in p:
        common += ["--steps-per-epoch", p["steps"]]
    epochs = p["supernet_epochs"] + p["finetune_epochs"]
    run = Path(args.out) / args.size / args.method
    if not (run / "supernet.pt").exists():
        resume = ["--resume", run] if (run / "last.pt").exists() else []
        chansearch("supernet", *(resume or ["mobilenet_v2_cifar", "--method", args.method, "--data", args.data,
                                            "--epochs", p["supernet_epochs"], "--lr", p["lr"], "--holdout",
                                            p["holdout"], "--min-width", 0.25, "--val-images", 1000,
                                            "--recal-images", p["recal"], "--eval-images", p["evals"],
                                            *common, "--out", run]))
    searches = ["greedy"] if args.method == "slimmable" else ["evolution", "random"]
    evaluations = None
    rows = []
    for method in searches:
        folder = run / f"search-{method}"
        if not (folder / "search.json").exists():
            extra = (["--greedy-step", p["greedy_step"]] if method == "greedy" else
                     ["--population", p["population"], "--parents", p["parents"], "--mutations", p["mutations"],
                      "--crossovers", p["crossovers"], "--iterations", p["iterations"]] if method == "evolution" else
                     ["--samples", evaluations])
            chansearch("search", run, "--method", method, "--macs", TARGETS, "--recal-images", p["recal"],
                       "--eval-images", p["evals"], "--quiet", *extra)
        result = json.loads((folder / "search.json").read_text())
        if method == "evolution":  # random search gets as many evaluations per target
            evaluations = (result["evaluated"] - 1) // len(result["targets"])
        for t in result["targets"]:
            tag = t["label"].split("<=")[-1]
            net = folder / f"net_{tag}.pt"
            tuned = folder / f"tuned_{tag}.pt"
            retrained = folder / f"retrain_{tag}"
            if not net.exists():
                chansearch("extract", run, "--search", folder, "--target", t["label"], "-o", net)
            if not tuned.exists():
                chansearch("finetune", net, "--data", args.data, "--epochs", p["finetune_epochs"], "--lr", p["lr"] / 5,
                           *common, "-o", tuned)
            if not (retrained / "model.pt").exists():
                resume = ["--resume", retrained] if (retrained / "last.pt").exists() else []
                chansearch("train", *(resume or [net, "--from-scratch", "--data", args.data, "--epochs", epochs,
                                                 "--lr", p["lr"], "--val-images", 1000, "--seed", 0, *common,
                                                 "--out", retrained]))
            before = json.loads(chansearch("eval", net, "--data", args.data, "--json"))
            after = json.loads(chansearch("eval", tuned, "--data", args.data, "--json"))
            scratch = json.loads(chansearch("eval", retrained / "model.pt", "--data", args.data, "--json"))
            rows.append(f"| {args.method} | {method} | {t['label']} | {t['macs'] / 1e6:.2f}M | {t['params'] / 1e6:.3f}M "
                        f"| {t['top1']:.2%} | {before['top1']:.2%} | {after['top1']:.2%} | {scratch['top1']:.2%} |")
    baselines = []
    for folder in sorted(Path(args.baselines, args.size).glob("w*")):
        if (folder / "model.pt").exists():
            test = json.loads(chansearch("eval", folder / "model.pt", "--data", args.data, "--json"))
            prof = json.loads(chansearch("profile", folder / "model.pt", "--json"))
            baselines.append(f"| uniform {folder.name[1:]}x | - | - | {prof['macs'] / 1e6:.2f}M "
                             f"| {prof['params'] / 1e6:.3f}M | - | - | - | {test['top1']:.2%} |")
    settings = ", ".join(f"{k}={v}" for k, v in p.items())
    write_section(f"Channel search vs uniform widths: {args.method} ({args.size})", "\n".join([
        f"mobilenet_v2_cifar on `{args.data}`: {args.method} supernet trained {p['supernet_epochs']} epochs on "
        f"25,000 - {p['holdout']} training images (the rest held out for the search), searched at {TARGETS} of "
        f"the full MACs, extracted, fine-tuned {p['finetune_epochs']} epochs on all training images (so "
        f"{epochs} epochs in all), and separately retrained from scratch (`chansearch train NET --from-scratch`) "
        f"for {epochs} epochs at lr {p['lr']}, the schedule of the uniform baselines (bench_reference.py, "
        f"trained from scratch); test top-1 on the 10,000 test images. "
        f"Settings: {settings}. 'held-out' is the supernet's accuracy at the config (BN recalibrated) on "
        "the held-out images; 'extracted' the standalone net before fine-tuning.", "",
        "| supernet | search | target | MACs | params | held-out top-1 | extracted test top-1 | fine-tuned test top-1 "
        "| from-scratch test top-1 |",
        "|---|---|---|---|---|---|---|---|---|", *rows, *baselines]))


if __name__ == "__main__":
    main()
