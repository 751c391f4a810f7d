"""Recovering a pruned pretrained net with the few images a user has, side by side.

The teacher is a pretrained net transferred to the data at its real resolution (--teacher: the
shared ImageNet MobileNetV2 trained on CIFAR-10 at 224 px, see RESULTS.md). It is pruned once
per MAC target by our direct path (`chansearch prune --data`, on the same training pool). For
each number of training images (a seeded subset of the training split, written as the user's
own `npz:` file) and each seed, the pruned net is recovered by:

- `finetune`: `chansearch finetune PRUNED --data npz:FILE --epochs E --batch-size 32 --teacher T`
  with every other setting at its default (block-wise reconstruction first; no lr given: the lr
  trial picks it);
- `finetune-noblocks`: the same with `--block-steps 0` (the defaults before block-wise
  reconstruction);
- `finetune-features`: the same with `--feature-weight 1` (every layer also distilled from the
  teacher's output on the channels it kept);
- `finetune-lr0.01`: the same with `--lr 0.01`, the default before the lr trial;
- `finetune-plainloss`: the same with the plain loop's loss mix (`--kd-weight 0.7
  --label-smoothing 0`; the defaults are 0.5 and 0.1);
- `plain`: the loop a user writes: SGD (Nesterov, momentum 0.9), cosine lr, random flips, 0.7 KD
  (T=4) on the teacher's logits + 0.3 cross-entropy, BN in train mode, the same E epochs of
  batch 32 over the same images; at each lr of the grid, the row showing the one the first
  seed did best with on the test images (the user's best case).

Reported per cell: top-1 on test images, fidelity (top-1 agreement with the teacher), the
distillation loss against the teacher on the test images (KL at T=1), and wall time. Cells are
stored under --cells as they finish, so an interrupted run continues where it stopped; the table
shows every finished cell there. Each cell keeps its recovered net (`runs/<cell>/model.pt`), so
`--rescore N` can score this run's cells again on N test images outside the table's (on 500
test images, half a point on one seed is noise); a cell that kept no net (a `plain` cell run
before cells kept theirs, or one whose run folder was lost) is recovered again the same way (the
plain loop at its lr), and its new score on the table's images is kept beside the old.

    python benchmarks/bench_recovery.py --teacher runs/teacher224/model.pt --size cpu224
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common import CIFAR, mean_std, user_loop, write_section
from compress import load, stages
from compress.checkpoint import save_checkpoint
from compress.data.specs import sample_labelled, split
from compress.files import atomic_write_json
from compress.settings import DataSettings, FinetuneSettings, PruneSettings
from compress.training.keep_best import KEPT_FILE
from compress.training.lr_trial import TRIAL_FILE

SIZES = {  # test images, training-image counts, MAC targets, epochs, the plain loop's lr grid
    "quick": dict(test=64, images=(64,), macs=(0.5,), epochs=1, lrs=(0.001,)),
    "cpu32": dict(test=1000, images=(100, 500), macs=(0.5,), epochs=3, lrs=(0.001, 0.01)),  # a 32-px teacher
    "cpu224": dict(test=500, images=(500,), macs=(0.5,), epochs=3, lrs=(0.001, 0.01)),
    "gpu": dict(test=10000, images=(100, 500, 5000), macs=(0.7, 0.5, 0.3), epochs=3, lrs=(0.0003, 0.001, 0.003, 0.01)),
}
RECOVERIES = ("finetune", "finetune-noblocks", "finetune-features", "finetune-lr0.01", "finetune-plainloss", "plain")
VARIANTS = {"finetune-noblocks": {"block_steps": 0}, "finetune-features": {"feature_weight": 1.0},
            "finetune-lr0.01": {"lr": 0.01}, "finetune-plainloss": {"kd_weight": 0.7, "label_smoothing": 0.0}}


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.eval()(x) for x in images.split(100)])


def scores(model: nn.Module, teacher: nn.Module | torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1, fidelity and KL at T=1 against `teacher` (a net, or its logits on `images`)."""
    out = logits(model, images)
    ref = teacher if isinstance(teacher, torch.Tensor) else logits(teacher, images)
    kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), reduction="sum", log_target=True).item()
    return {"top1": (out.argmax(1) == labels).sum().item() / len(labels),
            "fidelity": (out.argmax(1) == ref.argmax(1)).sum().item() / len(labels), "kd_loss": kl / len(labels)}


def user_pool(spec: str, count: int, card) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's images as the plain loop reads them: all in memory, at the teacher's size."""
    return sample_labelled(spec, True, count, card.input_size, card.mean, card.std, seed=0)


def user_images(cells: Path, data: str, count: int, seed: int) -> str:
    """`count` training images picked with `seed`, as the user's own npz file."""
    path = cells / f"train_{count}_seed{seed}.npz"
    if not path.exists():
        with np.load(Path(data.split(":", 1)[1]) / "train.npz") as f:
            pick = np.random.default_rng(100 + seed).permutation(len(f["y"]))[:count]
            np.savez(path, x=f["x"][pick], y=f["y"][pick])
    return f"npz:{path}"


def recover_finetune(pruned: Path, teacher: nn.Module, spec: str, epochs: int, seed: int, run: Path,
                     **changes) -> nn.Module:
    """`chansearch finetune` at its defaults but for `changes` (FinetuneSettings fields)."""
    settings = FinetuneSettings(epochs=epochs, seed=seed, **changes)
    # a cell is done when its scores are written: a folder without them was left by an interrupted
    # recovery (or is rescored), and the recovery starts again from the pruned net
    shutil.rmtree(run, ignore_errors=True)
    torch.manual_seed(seed)
    return stages.train(load(pruned), DataSettings(spec=spec, batch_size=32, workers=0), settings, run,
                        teacher=teacher, quiet=True).model.eval()


def recover_plain(pruned: Path, teacher: nn.Module, pool: tuple[torch.Tensor, torch.Tensor], epochs: int, seed: int,
                  lr: float) -> nn.Module:
    """A user's own loop (`common.user_loop`), `epochs` passes of batch 32 over the pool."""
    student = load(pruned)  # before the seed: building the net draws from the global generator
    steps = epochs * (len(pool[0]) // 32)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.cat([torch.randperm(len(pool[0]), generator=generator) for _ in range(epochs)])
    picks = (order[step * 32:(step + 1) * 32] for step in range(steps))
    return user_loop(student, teacher, pool, picks, steps, lr, generator)


def recover(cells: Path, recovery: str, macs: float, count: int, seed: int, ctx: dict,
            lrs: tuple[float, ...]) -> dict:
    """The pruned net recovered one way, kept as the cell's `runs/<cell>/model.pt`, and how (its lr and
    its scores on the table's test images; the plain loop tries each of `lrs` and keeps its best there,
    the user's best case)."""
    teacher, size, pruned = ctx["teacher"], ctx["size"], ctx["pruned"][macs]
    spec = user_images(cells, ctx["data"], count, seed)
    run = cells / "runs" / f"{recovery}_{macs:.2f}_{count}_{seed}"
    if recovery == "plain":
        pool = user_pool(spec, count, teacher.card)
        results, nets = [], []
        for lr in lrs:
            nets.append(recover_plain(pruned, teacher, pool, size["epochs"], seed, lr))
            results.append({"lr": lr, **scores(nets[-1], teacher, *ctx["test"])})
        best = max(range(len(lrs)), key=lambda i: results[i]["top1"])
        save_checkpoint(run / "model.pt", nets[best], {"lr": lrs[best]})
        return {**results[best], "tried": results}
    changes = VARIANTS.get(recovery, {})
    tuned = recover_finetune(pruned, teacher, spec, size["epochs"], seed, run, **changes)
    return {**how_finetuned(run, changes.get("lr")), **scores(tuned, teacher, *ctx["test"])}


def how_finetuned(run: Path, lr: float | None = None) -> dict:
    """The lr a fine-tune run's trial picked (`lr` where it was given) and the step keep-best handed back."""
    trial = run / TRIAL_FILE
    return {"lr": json.loads(trial.read_text())["lr"] if trial.exists() else lr,
            "kept_step": json.loads((run / KEPT_FILE).read_text())["step"]}


def run_cell(cells: Path, recovery: str, macs: float, count: int, seed: int, ctx: dict) -> dict:
    path = cells / f"{recovery}_{macs:.2f}_{count}_{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    lrs = ctx["size"]["lrs"]
    if recovery == "plain" and seed != min(ctx["seeds"]):  # later seeds run at the lr the first did best with
        lrs = (json.loads((cells / f"plain_{macs:.2f}_{count}_{min(ctx['seeds'])}.json").read_text())["lr"],)
    began = time.perf_counter()
    how = recover(cells, recovery, macs, count, seed, ctx, lrs)
    cell = {**how, "recovery": recovery, "macs": macs, "images": count, "seed": seed,
            "seconds": round(time.perf_counter() - began, 1)}
    atomic_write_json(path, cell)
    return cell


def other_test_images(data: str, card, skip: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` test images that follow the table's `skip` in its seeded order (so none of them)."""
    ds = split(data, False, card.input_size, card.mean, card.std, augment=False)
    if skip + count > len(ds):
        raise SystemExit(f"--rescore {count}: the test split holds {len(ds)} images and the table uses {skip}; "
                         f"give at most {len(ds) - skip}.")
    pairs = [ds[int(i)] for i in np.sort(np.random.default_rng(1).permutation(len(ds))[skip:skip + count])]
    return torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])


def rescore(cells: Path, stems: list[str], count: int, ctx: dict) -> None:
    """This run's finished cells, the pruned nets and the teacher scored on `count` other test
    images (each cell's `others`; `others/COUNT.json` for the rest)."""
    teacher, size = ctx["teacher"], ctx["size"]
    images, labels = other_test_images(ctx["data"], teacher.card, size["test"], count)
    reference = logits(teacher, images)
    file = cells / "others" / f"{count}.json"
    base = json.loads(file.read_text()) if file.exists() else {"pruned": {}}
    base["teacher"] = scores(teacher, reference, images, labels)
    base["pruned"].update({f"{m:.2f}": scores(load(p), reference, images, labels) for m, p in ctx["pruned"].items()})
    atomic_write_json(file, base)
    for stem in sorted(stems, key=lambda stem: not (cells / "runs" / stem / "model.pt").exists()):  # cheap first
        path, net = cells / f"{stem}.json", cells / "runs" / stem / "model.pt"
        cell = json.loads(path.read_text()) if path.exists() else None
        if cell is None or cell.get("others", {}).get("images") == count:
            continue
        again = {}
        if not net.exists():  # a plain cell from before cells kept their nets, or a cell restored from a note
            how = recover(cells, cell["recovery"], cell["macs"], cell["images"], cell["seed"], ctx, (cell["lr"],))
            again = {"trained_again_top1": how["top1"]}
        cell["others"] = {"images": count, **scores(load(net), reference, images, labels), **again}
        atomic_write_json(path, cell)
        print(f"{stem}: top-1 {cell['others']['top1']:.2%} on {count} other test images", flush=True)


def table(cells: list[dict], before: dict, others: tuple[int, dict] | None = None) -> str:
    """One row per (MACs, images, recovery) over seeds; with `others` (COUNT, others/COUNT.json),
    a column of top-1 on those other test images."""
    extra = f" top-1 % on {others[0]} other test images |" if others else ""
    rows = ["| MACs | images | recovery | top-1 % | fidelity % | KD loss vs teacher | lr | seeds | seconds |" + extra,
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if others else "")]
    for macs in sorted({c["macs"] for c in cells}, reverse=True):
        b = before[macs]
        start = others and others[1]["pruned"].get(f"{macs:.2f}")
        rows.append(f"| {macs:.0%} | - | pruned, before recovery | {b['top1'] * 100:.1f} | {b['fidelity'] * 100:.1f} | "
                    f"{b['kd_loss']:.3f} | - | - | - |" + (f" {start['top1'] * 100:.1f} |" if start else " - |" if others else ""))
        for count in sorted({c["images"] for c in cells}):
            for recovery in RECOVERIES:
                group = [c for c in cells if (c["macs"], c["images"], c["recovery"]) == (macs, count, recovery)]
                if not group:
                    continue
                lrs = sorted({f"{c['lr']:.2g}" for c in group})
                rescored = [c["others"]["top1"] for c in group if others and c.get("others", {}).get("images") == others[0]]
                rows.append(f"| {macs:.0%} | {count} | {recovery} | {mean_std([c['top1'] for c in group])} | "
                            f"{mean_std([c['fidelity'] for c in group])} | "
                            f"{mean_std([c['kd_loss'] for c in group], 1, 3)} | {', '.join(lrs)} | {len(group)} | "
                            f"{statistics.mean(c['seconds'] for c in group):.0f} |" +
                            (f" {mean_std(rescored) if rescored else '-'}"
                             f"{f' ({len(rescored)} of {len(group)} seeds)' if 0 < len(rescored) < len(group) else ''} |"
                             if others else ""))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the transferred teacher checkpoint")
    ap.add_argument("--data", default=f"cifar10:{CIFAR}", help="its data (cifar10:DIR with train/test.npz)")
    ap.add_argument("--size", choices=SIZES, default="cpu224")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--recoveries", default=",".join(RECOVERIES))
    ap.add_argument("--cells", default="runs/bench_recovery", help="folder of finished cells (resumable)")
    ap.add_argument("--macs", help="MAC targets in place of the size's, e.g. 0.7,0.5,0.3")
    ap.add_argument("--images", help="training-image counts in place of the size's, e.g. 100,500")
    ap.add_argument("--rescore", type=int, default=0, metavar="N",
                    help="score this run's finished cells again on N test images outside the table's")
    ap.add_argument("--label", help="write the table to a RESULTS section of its own, named with this label "
                                    "(a run with another teacher or code beside the main table)")
    args = ap.parse_args()
    size, cells = SIZES[args.size], Path(args.cells)
    if args.macs:
        size = {**size, "macs": tuple(float(m) for m in args.macs.split(","))}
    if args.images:
        size = {**size, "images": tuple(int(n) for n in args.images.split(","))}
    cells.mkdir(parents=True, exist_ok=True)
    teacher = load(args.teacher).eval()
    card = teacher.card
    test = sample_labelled(args.data, False, size["test"], card.input_size, card.mean, card.std, seed=1)
    pruned, before = {}, {}
    for macs in size["macs"]:
        path = cells / f"pruned_{macs:.2f}.pt"
        if not path.exists():
            stages.prune(copy.deepcopy(teacher), PruneSettings(), macs=f"{macs:.0%}", data=args.data, output=path)
        pruned[macs], before[macs] = path, scores(load(path), teacher, *test)
    ctx = {"teacher": teacher, "size": size, "pruned": pruned, "test": test, "data": args.data,
           "seeds": range(args.seeds)}
    for macs, count, seed, recovery in itertools.product(size["macs"], size["images"], range(args.seeds),
                                                         args.recoveries.split(",")):
        run_cell(cells, recovery, macs, count, seed, ctx)
    if args.rescore:
        rescore(cells, [f"{r}_{m:.2f}_{n}_{s}" for m, n, s, r in itertools.product(
            size["macs"], size["images"], range(args.seeds), args.recoveries.split(","))], args.rescore, ctx)
    done = [json.loads(path.read_text()) for path in sorted(cells.glob("*.json"))]  # this run's and earlier ones'
    for path in cells.glob("pruned_*.pt"):
        macs = float(path.stem.split("_")[1])
        before[macs] = before.get(macs) or scores(load(path), teacher, *test)
    teacher_scores = scores(teacher, teacher, *test)
    rescored = sorted(cells.glob("others/*.json"), key=lambda p: int(p.stem))
    others = (int(rescored[-1].stem), json.loads(rescored[-1].read_text())) if rescored else None
    also = f" ({others[1]['teacher']['top1']:.1%} on {others[0]} others)" if others else ""
    write_section(f"Recovery with few images ({args.size})" + (f": {args.label}" if args.label else ""), "\n".join([
        f"Teacher `{args.teacher}`: {card.input_size} px, test top-1 {teacher_scores['top1']:.1%} on {size['test']} "
        f"test images{also}; pruned by `chansearch prune --data` (energy, global, refit); {size['epochs']} epochs of batch "
        f"32 over the user's images; the plain loop's lr grid {', '.join(map(str, size['lrs']))}.", "",
        table(done, before, others)]))


if __name__ == "__main__":
    main()
