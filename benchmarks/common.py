"""Shared by the benchmark scripts: the machine description, RESULTS.md section updates, the
timing of a pruned net's float and int8 files beside the unpruned net's, and the recovery loop a
user writes."""
from __future__ import annotations

import datetime
import json
import os
import statistics
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from compress import stages
from compress.errors import CheckFailed
from compress.export import measure
from compress.latency import clock as latency_clock
from compress.settings import ExportSettings

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# CIFAR-10 arrays beside the checkout (see ../shared/data/cifar10/README.md)
CIFAR = os.path.relpath(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu()}, {os.cpu_count()} cores, {gpu}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def cpu() -> str:
    """The CPU and the vector extensions int8 and float kernels depend on, as the kernel
    reports them (latency ratios between int8 and float files turn on them)."""
    model, flags = latency_clock.cpu()
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm") if f in flags]
    return f"{model} ({', '.join(wanted) or 'none of avx2/avx512/vnni/amx'})"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `## name` of RESULTS.md with `body`, stamped with
    the command that produced it, the date and the machine."""
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], RESULTS.parent.parent), *sys.argv[1:]])
    stamp = datetime.date.today().isoformat()
    section = (f"## {name}\n\nCommand: `{command}`  \nDate: {stamp}  \nMachine: {machine()}\n\n"
               f"{body.strip()}\n")
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nThe latest tables, each written by the script named in its command.\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
    print(section)


def mean_std(values: list[float], scale: float = 100, digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0] * scale:.{digits}f}"
    return f"{statistics.mean(values) * scale:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def column(cells: list[dict], key: str, scale: float = 100, digits: int = 1) -> str:
    """`key`'s mean ± std over the cells that have it (across seeds), "-" where none does."""
    values = [c[key] for c in cells if c.get(key) is not None]
    return mean_std(values, scale, digits) if values else "-"


def timed_files(net: torch.nn.Module, unpruned: torch.nn.Module, data: str, px: int, folder: Path,
                rounds: int = 3) -> dict:
    """Float and int8 TFLite files of `net` and `unpruned` at a `px` input, each of `net`'s timed
    in interleaved rounds beside `unpruned`'s of the same kind (LiteRT, 1 thread): the median
    ms and its ratio (`time_files`); the int8 files calibrated on 64 images of `data`, and
    `net`'s int8 parity report (its gate: the task's agreement with the float model) under
    "int8_parity"."""
    out: dict = {}
    for kind, options in (("float", ExportSettings()), ("int8", ExportSettings(int8=True, calib_images=64))):
        for name, model in (("unpruned", unpruned), ("pruned", net)):
            try:
                report = stages.export(model, "tflite", folder / f"{name}_{kind}.tflite", options, data=data,
                                       input_size=px)
            except CheckFailed as failed:  # written, but under the gate: timed, and the gate reported
                report = failed.report
            if name == "pruned" and kind == "int8":
                out["int8_parity"] = {k: v for k, v in report["parity"].items() if not isinstance(v, dict)}
    return {**out, **time_files(folder, rounds)}


def time_files(folder: Path, rounds: int = 3) -> dict:
    """The pruned files of `timed_files`' folder timed in interleaved rounds beside the
    unpruned ones of the same kind: median ms and its ratio, per kind (float, int8). Run again
    on a quiet machine (the scripts' --retime) when the first timing shared the cores."""
    out: dict = {}
    for kind in ("float", "int8"):
        paths = {name: folder / f"{name}_{kind}.tflite" for name in ("unpruned", "pruned")}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, path in paths.items():
                times[name].append(measure(path, "tflite", threads=1, warmup=3, runs=20)["median_ms"])
        out[f"{kind}_ms"] = statistics.median(times["pruned"])
        out[f"{kind}_x"] = statistics.median(times["pruned"]) / statistics.median(times["unpruned"])
    return out


def side_by_side_arguments(ap, sizes: dict, cells: str) -> None:
    """The options every side-by-side script (bench_embed, bench_sr) takes."""
    ap.add_argument("--size", choices=sizes, default="cpu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--targets", default="0.7,0.5", help="MAC shares to prune to")
    ap.add_argument("--cells", default=cells, help="folder keeping each finished cell")
    ap.add_argument("--retime", action="store_true", help="time the stored cells' files again (a quiet machine)")


def retime(cells_dir: Path, cells: list[dict], tag: Callable[[dict], str]) -> None:
    """Time each cell's files again (`time_files`, the folder `files_TAG` beside `TAG.json`)
    and store the cell: for a quiet machine after a run that shared its cores."""
    for cell in cells:
        folder = cells_dir / f"files_{tag(cell)}"
        if folder.is_dir():
            cell.update(time_files(folder))
            (cells_dir / f"{tag(cell)}.json").write_text(json.dumps(cell))


def user_loop(student: nn.Module, teacher: nn.Module, pool: tuple[torch.Tensor, torch.Tensor],
              picks: Iterable[torch.Tensor], steps: int, lr: float, generator: torch.Generator) -> nn.Module:
    """The recovery loop a user writes: SGD (Nesterov, momentum 0.9), cosine lr over `steps`, random
    flips, 0.7 KD (T=4) on the teacher's logits + 0.3 cross-entropy, BN in train mode; a step
    for each batch of indices into `pool` that `picks` yields (drawn lazily, so a caller's
    `generator` serves its picks and the flips in turn)."""
    images, labels = pool
    student.train()
    teacher.eval()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=4e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for idx in picks:
        x, y = images[idx], labels[idx]
        x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=generator) < 0.5, x.flip(3), x)
        with torch.no_grad():
            soft = F.log_softmax(teacher(x) / 4, 1)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / 4, 1), soft, reduction="batchmean", log_target=True) * 16
        loss = 0.7 * kd + 0.3 * F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student.eval()
