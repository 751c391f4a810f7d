"""Shared by the benchmark scripts: the machine description and RESULTS.md section updates."""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# CIFAR-10 arrays beside the checkout (see ../shared/data/cifar10/README.md)
CIFAR = os.path.relpath(Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `## name` of RESULTS.md with `body`, stamped with
    the command that produced it, the date and the machine."""
    command = "python " + " ".join([os.path.relpath(sys.argv[0], RESULTS.parent.parent), *sys.argv[1:]])
    stamp = datetime.date.today().isoformat()
    section = (f"## {name}\n\nCommand: `{command}`  \nDate: {stamp}  \nMachine: {machine()}\n\n"
               f"{body.strip()}\n")
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nThe latest tables, each written by the script named in its command.\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
    print(section)
