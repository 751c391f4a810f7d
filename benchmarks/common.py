"""Shared by the benchmark scripts: the machine description and RESULTS.md section updates."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

from compress.latency import clock as latency_clock

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
