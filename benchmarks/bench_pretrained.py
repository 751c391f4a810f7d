"""Pruning a pretrained network, side by side with the tools a user would pick instead.

The teacher is a pretrained net already transferred to the data (--teacher: the ImageNet
MobileNetV2 of ../shared/pretrained trained on CIFAR-10 at 96 or 224 px, see RESULTS.md; its
card gives the resolution). Every method prunes it to each MAC target; every pruned net then
gets the *same* recoveries, two protocols at each lr of the size's grid (the row shows its best):

- `finetune`: ours, what `chansearch finetune --teacher` runs (compress.training.loop.fit with
  FinetuneSettings' defaults: distillation, warm-up, keep-best on held-out training images);
- `plain`: the loop a user writes: SGD (Nesterov), cosine, random flips, KD from the teacher
  (T=4, weight 0.7) plus cross-entropy, BN in train mode, on a fixed pool of training images.

`--seeds` recovery seeds per row, the later ones at the lr the first one did best with and on
the same pruned net (the seed moves the recovery's batches and augmentation, not the pruning).
Reported: top-1 on test images before and after each recovery, sharpness (the gradient norm of
the cross-entropy on one fixed batch, BN in eval mode, over the teacher's on the same batch), MACs
and params kept, float TFLite latency against the teacher (LiteRT, 1 thread, interleaved
rounds), and the method's own pruning time.

Methods: `compress` (our default for a pretrained net, `chansearch prune --data`), the same with
BN re-estimated instead of the refit (`compress-norefit`), with `--strategy uniform`
(`compress-uniform`), weight magnitude with BN re-estimated (`compress-l1-global`), our supernet
path (`compress-slimmable`: a slimmable supernet trained from the teacher, distilled from it, then
greedy search; `compress-slimmable-teacher`: the searched widths cut from the teacher's own
weights and refitted, `extract --teacher`; `compress-pruningnet-teacher`: the same from
MetaPruning's PruningNet fitted to the teacher and evolution; `--supernet-steps`, `--score-size`),
Torch-Pruning 1.6's MetaPruner at its defaults (global magnitude, its pruning
ratio searched to the MAC target; `tp` round_to=None, `tp-r8` round_to=8) and NVIDIA Model
Optimizer's FastNAS (`fastnas`; `pip install -e .[benchmark]`).

Each (method, target, seed) cell is stored under --cells as it finishes, so an interrupted
run continues where it stopped and the table can be filled over several runs.

    python benchmarks/bench_pretrained.py --teacher runs/teacher224/model.pt --size cpu224
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from common import CIFAR, user_loop, write_section
from pretrained_tables import METHODS, after_key, family, table, tried
from compress import load, stages
from compress.data.specs import sample_labelled
from compress.export.latency import measure
from compress.export.tflite import export_tflite
from compress.files import atomic_save, atomic_write_json
from compress.pruning.profile import count
from compress.settings import (DataSettings, FinetuneSettings, HeldOutScoring, LutSettings, PruneSettings,
                               SearchSettings, SupernetSettings, Target)
from compress.training.keep_best import kept_best
from compress.training.loop import fit

# evolution on 2 cores: 16 + 4 x 16 candidates scored, not MetaPruning's 50 + 20 x 50
SMALL_EVOLUTION = dict(population=16, parents=4, mutations=8, crossovers=8, iterations=4)
SIZES = {  # recovery steps and batch, lrs tried; images: plain loop's pool, test, FastNAS/search scoring;
    # supernet training steps, greedy step (share of the MACs), evolution settings
    "cpu": dict(steps=150, batch=64, lrs=(0.005, 0.001), pool=6400, test=2000, score=512, supernet=300, greedy=0.1,
                evolution=SMALL_EVOLUTION),
    "cpu224": dict(steps=45, batch=32, lrs=(0.01, 0.001), pool=1440, test=500, score=256, supernet=100, greedy=0.1,
                   evolution=SMALL_EVOLUTION),
    "gpu": dict(steps=1000, batch=128, lrs=(0.01, 0.002), pool=25000, test=10000, score=2000, supernet=3000,
                greedy=0.05, evolution={}),  # MetaPruning's search at SearchSettings' defaults
    "quick": dict(steps=3, batch=16, lrs=(0.005, 0.001), pool=64, test=64, score=64, supernet=3, greedy=0.3,
                  evolution=dict(population=4, parents=2, mutations=2, crossovers=2, iterations=1)),
}
SUPERNET_ROWS = {"compress-slimmable": "slimmable", "compress-slimmable-teacher": "slimmable",
                 "compress-pruningnet-teacher": "pruningnet"}  # the supernet each row searches
PROTOCOLS = ("finetune", "plain")


def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in zip(images.split(100), labels.split(100)))
    return hits / len(labels)


def grad_norm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The cross-entropy's gradient norm over all weights on one batch, BN in eval mode: how far
    one SGD step moves the net's function (a refitted net can be far sharper than its teacher)."""
    model = copy.deepcopy(model).eval()
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))


# ---- the methods: each returns the pruned model -----------------------------------------------
def ours(teacher, target, data, settings: PruneSettings):
    return stages.prune(teacher, settings, macs=target, data=data, progress=True).model


def supernet_path(teacher, budget: Target, ctx: dict, cells: Path, kind: str, from_teacher: bool,
                  clock: LutSettings = LutSettings()) -> nn.Module:
    """Ours, the supernet path: a supernet trained from the teacher, its channels ordered as
    `prune --data` ranks them (`slimmable`: every width distilled from the teacher at a transfer
    lr, then AutoSlim's greedy search; `pruningnet`: MetaPruning's hypernetworks fitted to the
    teacher, then evolution), searched to the target on held-out training images, the config
    extracted with BN recalibrated (`from_teacher`: cut from the teacher's own weights and
    refitted, as `extract --teacher` does). Each supernet is trained once, for the first target
    that asks (its time counts there), and its search is shared by its rows. A latency budget
    is predicted by this machine's cached latency model of the space on `clock`."""
    run, size = cells / kind, ctx["size"]
    scoring = dict(recal_images=min(256, size["score"]), eval_images=size["score"], score_size=ctx["score_size"])
    if not (run / "supernet.pt").exists():
        settings = SupernetSettings(method=kind, epochs=1, steps_per_epoch=size["supernet"], lr=0.005,
                                    warmup_epochs=0.1, weight_decay=4e-5, holdout=2000, val_images=size["score"],
                                    num_random=2)
        stages.train_supernet(copy.deepcopy(teacher), DataSettings(spec=ctx["data"], batch_size=size["batch"]),
                              settings, run, HeldOutScoring(**scoring), pretrained=True, resume=run.exists(),
                              record={"supernet_steps": size["supernet"]})
    method = "greedy" if kind == "slimmable" else "evolution"
    # one folder per kind of budget: its scored configs carry over between budgets (resumed), and
    # configs scored with a latency model also carry their predicted time
    search = run / (f"search-{method}" if budget.latency is None else f"search-{method}-latency")
    settings = SearchSettings(method=method, greedy_step=size["greedy"], targets=[budget], **size["evolution"],
                              **scoring)
    stages.search(run, settings, out=search, clock=clock)
    with tempfile.TemporaryDirectory() as work:
        return stages.extract(run, Path(work) / "net.pt", None, search, teacher=teacher if from_teacher else None).model


def torch_pruning(teacher, target, round_to):
    """Torch-Pruning's documented path: MetaPruner, GroupMagnitudeImportance, global pruning;
    the pruning ratio is bisected until the MACs are at most the target."""
    import torch_pruning as tp
    example = torch.randn(1, 3, teacher.card.input_size, teacher.card.input_size)
    full = tp.utils.count_ops_and_params(teacher, example)[0]

    def pruned_at(ratio):
        model = copy.deepcopy(teacher).eval()
        classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(),
                             pruning_ratio=ratio, global_pruning=True, ignored_layers=[classifier],
                             round_to=round_to).step()
        return model, tp.utils.count_ops_and_params(model, example)[0]

    lo, hi, best = 0.0, 1.0, None
    for _ in range(12):
        mid = (lo + hi) / 2
        model, macs = pruned_at(mid)
        if macs <= target * full:
            hi, best = mid, model
        else:
            lo = mid
    return best


def fastnas(teacher, target, calib, score_set, cells: Path):
    import modelopt.torch.prune as mtp
    model = copy.deepcopy(teacher).eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*calib), batch_size=64)
    size = teacher.card.input_size
    model, _ = mtp.prune(model, mode="fastnas", constraints={"flops": f"{target:.0%}"},
                         dummy_input=torch.randn(1, 3, size, size),
                         config={"data_loader": loader, "collect_func": lambda batch: batch[0],
                                 "score_func": lambda m: top1(m, *score_set),
                                 # its sensitivity map does not depend on the target: FastNAS reloads
                                 # it from here for the next target (only the first cell pays for it)
                                 "checkpoint": str(cells / "fastnas_search.pth")})
    return model


# ---- the recoveries, the same for every row ------------------------------------------------------
def recover_finetune(student: nn.Module, teacher: nn.Module, ctx: dict, lr: float, seed: int
                     ) -> tuple[nn.Module, dict]:
    """What `chansearch finetune PRUNED --teacher TEACHER --epochs 1 --steps-per-epoch N --lr LR`
    runs: FinetuneSettings' defaults otherwise. With the step of the state keep-best returned
    (0: the pruned net as it was)."""
    size = ctx["size"]
    student = copy.deepcopy(student)
    student.card = teacher.card  # a peer's pruned net: fit reads the card for the data's input size
    settings = FinetuneSettings(epochs=1, steps_per_epoch=size["steps"], lr=lr, seed=seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as run:
        tuned = fit(student, DataSettings(spec=ctx["data"], batch_size=size["batch"], workers=1), settings, run,
                    teacher=teacher, validate=False, quiet=True).eval()
        return tuned, {"kept_step": kept_best(Path(run))["step"]}


def recover_plain(student: nn.Module, teacher: nn.Module, ctx: dict, lr: float, seed: int
                  ) -> tuple[nn.Module, dict]:
    """A user's own loop (`common.user_loop`) over batches drawn with replacement."""
    size, (images, _) = ctx["size"], ctx["pool"]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the classifier's dropout
    picks = (torch.randint(len(images), (size["batch"],), generator=generator) for _ in range(size["steps"]))
    return user_loop(copy.deepcopy(student), teacher, ctx["pool"], picks, size["steps"], lr, generator), {}


RECOVER = {"finetune": recover_finetune, "plain": recover_plain}


def latency_ratio(model: nn.Module, teacher_file: Path, size: int, workdir: Path, rounds: int = 3) -> float:
    path = workdir / "pruned.tflite"
    export_tflite(model, path, size)
    ratios = []
    for _ in range(rounds):  # interleaved: each round times the teacher and the pruned net back to back
        base = measure(teacher_file, threads=1, runs=30)["median_ms"]
        ratios.append(measure(path, threads=1, runs=30)["median_ms"] / base)
    return statistics.median(ratios)


def run_cell(cells: Path, method: str, target: float, seed: int, teacher, ctx: dict) -> dict:
    path = _cell_path(cells, method, target, seed)
    cell = _read(path)
    # later seeds recover at the lr the first seed did best with
    first = _read(_cell_path(cells, method, target, 0)) if seed else cell
    todo = [(p, lr) for p in ctx["protocols"] for lr in _lrs(first, p, ctx["size"], bool(seed))
            if after_key(p, lr) not in cell]
    if "before" in cell and not todo:
        return cell
    # the pruned net does not depend on the recovery seed: pruned once, under seed 0, and reused by
    # the later seeds (FastNAS spends ~25 min per target on 2 cores)
    shared = cells / f"{method}-{target:.2f}.pruned.pt"
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if shared.exists():
            pruned = with_weights(teacher, torch.load(shared, weights_only=True))
        else:
            torch.manual_seed(0)
            start = time.perf_counter()
            pruned = prune_with(method, teacher, target, ctx, cells)
            cell["pruning_s"] = time.perf_counter() - start
            atomic_save(pruned.state_dict(), shared)
        if "before" not in cell:
            macs, params = count(pruned, ctx["input_size"])
            if method in SUPERNET_ROWS:  # the supernet and search its row came from
                trained = json.loads((cells / SUPERNET_ROWS[method] / stages.ARGS_FILE).read_text())
                cell.update(supernet_steps=trained["supernet_steps"], score_size=ctx["score_size"])
            cell.update(method=method, target=target, seed=seed, macs=macs, params=params,
                        before=top1(pruned, *ctx["test"]), sharpness=grad_norm(pruned, *ctx["batch"]) / ctx["sharp"],
                        latency=latency_ratio(pruned, ctx["teacher_file"], ctx["input_size"], work))
            atomic_write_json(path, cell)
        for protocol, lr in todo:
            student, choice = RECOVER[protocol](pruned, teacher, ctx, lr, seed)
            cell[after_key(protocol, lr)] = top1(student, *ctx["test"])
            if "kept_step" in choice:
                cell[f"kept_step_{protocol}@{lr:g}"] = choice["kept_step"]
            atomic_write_json(path, cell)
    print(json.dumps(cell), flush=True)
    return cell


def prune_with(method: str, teacher, target: float, ctx: dict, cells: Path) -> nn.Module:
    ours_settings = {"compress": PruneSettings(),
                     "compress-norefit": PruneSettings(reconstruct_images=0),
                     "compress-uniform": PruneSettings(strategy="uniform"),
                     "compress-l1-global": PruneSettings(importance="l1", strategy="global", reconstruct_images=0)}
    if method in ours_settings:
        return ours(teacher, f"{target:.0%}", ctx["data"], ours_settings[method])
    if method in SUPERNET_ROWS:
        return supernet_path(teacher, Target(macs=f"{target:.0%}"), ctx, cells, SUPERNET_ROWS[method],
                             method.endswith("-teacher"))
    if method in ("tp", "tp-r8"):
        return torch_pruning(teacher, target, None if method == "tp" else 8)
    return fastnas(teacher, target, ctx["calib"], ctx["score"], cells)


def with_weights(teacher: nn.Module, state: dict) -> nn.Module:
    """The teacher's architecture cut to the layer shapes of a pruned net's `state` (any
    method's: only conv, BN and linear widths change), with those weights."""
    model = copy.deepcopy(teacher)
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if weight is None:
            continue
        if isinstance(module, nn.Conv2d):
            groups = weight.shape[0] if module.groups > 1 else 1  # depthwise stays depthwise
            new = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], module.kernel_size, module.stride,
                            module.padding, module.dilation, groups, bias=module.bias is not None)
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(weight.shape[0], module.eps, module.momentum)
        elif isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    model.load_state_dict(state)
    return model.eval()


def _cell_path(cells: Path, method: str, target: float, seed: int) -> Path:
    return cells / f"{method}-{target:.2f}-{seed}.json"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _lrs(first: dict, protocol: str, size: dict, later: bool) -> tuple[float, ...]:
    """The first seed runs every lr of the grid; later seeds the one it did best with (of all
    it ran, whatever grid this run has)."""
    if not later:
        return size["lrs"]
    tried = {float(k.split("@")[1]): v for k, v in first.items() if k.startswith(f"after_{protocol}@")}
    return (max(tried, key=tried.get),) if tried else ()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the pretrained, transferred checkpoint (.pt); its card gives "
                    "the input size")
    ap.add_argument("--data", default=f"cifar10:{CIFAR}", help="data spec (cifar10:DIR, imagefolder:DIR, ...)")
    ap.add_argument("--size", choices=list(SIZES), default="cpu", help="recovery steps and image counts")
    ap.add_argument("--macs", default="50%,30%,70%", help="MAC targets, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    ap.add_argument("--protocols", default=",".join(PROTOCOLS), help="recoveries, comma-separated, of: "
                    + ", ".join(PROTOCOLS))
    ap.add_argument("--lrs", default=None, help="recovery lrs the first seed tries, comma-separated (default: the "
                    "size's grid); fewer lrs, less time, and a row that shows the lr it ran at")
    ap.add_argument("--seeds", type=int, default=1, help="recovery seeds per cell")
    ap.add_argument("--cells", type=Path, default=Path("runs/bench_pretrained"), help="where finished cells are kept")
    ap.add_argument("--supernet-steps", type=int, default=None, help="training steps of the supernet rows' "
                    "supernet (default: the size's); used when --cells has no supernet yet")
    ap.add_argument("--score-size", type=int, default=None, help="input size the supernet rows' greedy search "
                    "scores at (default: the teacher's; `search --score-size`, a cheaper search)")
    ap.add_argument("--table-only", action="store_true", help="write the table from the finished cells, run none")
    ap.add_argument("--section", default=None, help="RESULTS.md section to write (default: 'Pruning a pretrained "
                    "net, side by side (SIZE px)'); another name keeps a separate run's table beside it")
    args = ap.parse_args()
    size = dict(SIZES[args.size])
    if args.supernet_steps is not None:
        size["supernet"] = args.supernet_steps
    if args.lrs:
        size["lrs"] = tuple(float(lr) for lr in args.lrs.split(","))
    if set(args.protocols.split(",")) - set(PROTOCOLS):
        ap.error(f"--protocols takes {', '.join(PROTOCOLS)}, comma-separated; got '{args.protocols}'")
    teacher = load(args.teacher).eval()
    card, data = teacher.card, args.data
    args.cells.mkdir(parents=True, exist_ok=True)
    teacher_file = args.cells / "teacher.tflite"
    if not teacher_file.exists():
        export_tflite(teacher, teacher_file, card.input_size)
    sample = lambda train, n, seed: sample_labelled(data, train, n, card.input_size, card.mean, card.std, seed=seed)  # noqa: E731
    ctx = {"data": data, "size": size, "input_size": card.input_size, "teacher_file": teacher_file,
           "score_size": args.score_size,
           "protocols": args.protocols.split(","), "test": sample(False, size["test"], 1),
           "pool": sample(True, size["pool"], 3), "calib": sample(True, 512, 0), "score": sample(True, size["score"], 2),
           "batch": sample(True, 32, 4)}
    ctx["sharp"] = grad_norm(teacher, *ctx["batch"])
    teacher_macs = count(teacher, card.input_size)[0]
    teacher_top1 = top1(teacher, *ctx["test"])
    for target in [] if args.table_only else [float(t.strip("%")) / 100 for t in args.macs.split(",")]:
        for method in args.methods.split(","):
            for seed in range(args.seeds):
                run_cell(args.cells, method, target, seed, teacher, ctx)
    stored = [json.loads(p.read_text()) for p in sorted(args.cells.glob("*.json"))]
    write_section(args.section or f"Pruning a pretrained net, side by side ({card.input_size} px)", "\n".join([
        f"Teacher `{args.teacher}` (a pretrained net transferred to {data.split(':')[0]}, {card.input_size} "
        f"px); top-1 on {size['test']} test images. The same two recoveries for every row, {size['steps']} steps of "
        f"{size['batch']} images at lr {' and '.join(f'{lr:g}' for lr in tried(stored))} (a row shows the better of "
        "those its first seed ran, `--lrs`): `finetune` is `chansearch finetune --teacher`'s (its defaults: distillation, warm-up, the best state "
        "on 500 held-out training images kept; 'start kept k/n': in k of n seeds that was the pruned net as it "
        f"was), the plain loop a user's own (SGD, cosine, flips, KD T=4 weight "
        f"0.7, BN in train mode, on {size['pool']} training images). Sharpness: the cross-entropy's gradient norm "
        "on one batch of 32 training images over the teacher's. Pruning with data (ours, FastNAS) uses 512 other "
        f"training images; FastNAS scores its candidates on {size['score']} more and its sensitivity pass, in the "
        "pruning time of the first target it ran, is reused for the others. Latency: float TFLite, LiteRT 1 thread, "
        "median of 3 interleaved rounds. Rows with several recovery seeds show mean ± std over them; the seeds share "
        "one pruned net and the later ones run at the lr the first did best with. The cells may come from several "
        "runs of the script (it resumes per cell); `--table-only` rewrites the table from all of them.", "",
        table(stored, teacher_top1, teacher_macs), "",
        "A family of models, one per target: each method's pruning times over the targets it ran (the supernet "
        "rows' include one supernet's training, in the first target that asked for it, and a search and an "
        "extraction per target):", "", family(stored)]))


if __name__ == "__main__":
    main()
