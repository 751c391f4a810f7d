"""Run folders: every stage that writes one holds it for the run (rank 0 locks it) and
refuses to start a new run over an old one (resume it instead); a front end that re-runs into
the same folder moves the old run aside first, never over it."""
from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.files import RunLock, atomic_write_json
from compress.training import distributed
from compress.training.loop import STATE_FILE

ARGS_FILE = "args.json"


def device() -> torch.device:
    return distributed.init()[2] if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def run_folder(out: str | Path, resume: bool, record: dict | None = None) -> Iterator[Path]:
    """Hold `out` for one run (rank 0 locks it): a new run refuses a folder that already holds
    one; `record` (what started the run, for resuming it) is written on a new run."""
    out = Path(out)
    distributed.init()
    if not distributed.is_main():
        yield out
        return
    with RunLock(out):
        if not resume and (out / STATE_FILE).exists():
            raise CompressError(f"run folder '{out}' already holds a run; resume it (`resume`), or choose another "
                                "folder.")
        if record is not None and not resume:
            atomic_write_json(out / ARGS_FILE, record)
        yield out


def move_aside(folder: Path) -> Path | None:
    """Keep an earlier run's folder as `<name>.previous` (replacing an older one there), so a new
    run starts empty and nothing of the last one is lost. Returns where it went."""
    if not folder.exists():
        return None
    aside = folder.with_name(f"{folder.name}.previous")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    return aside


def digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
