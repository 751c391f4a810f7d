"""Converting many nets to a clock's files at once, a process per core: converting MobileNetV2
at 224 px to TFLite is 5.7 s of single-threaded Python, timing the file 0.34 s, so conversions
are what a latency model's build waits for (benchmarks/RESULTS.md, "Latency model build time").

Each worker is a fresh `python -m compress.latency.workers JOBFILE`, not a multiprocessing
child: those import the caller's main script again, which reruns a user's script that calls
`compress.prune(latency=...)` without an `if __name__ == "__main__"` guard.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from compress.errors import CompressError
from compress.latency.clock import Clock
from compress.logs import quiet_runtimes, runtimes_quiet


def cores() -> int:
    """The cores this process may run on (the affinity mask, which containers set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def export_all(clock: Clock, nets: Sequence[nn.Module], input_size: int, paths: Sequence[Path],
               progress: str | None = None) -> None:
    """Write each net as `clock`'s file (`Clock.export`), on a worker per core. A net whose
    classes only this process can import (a model from the user's own file) is converted here.
    `progress`: a progress bar's label."""
    paths = [Path(p) for p in paths]
    bar = tqdm(total=len(nets), desc=progress, unit="model", disable=progress is None)
    payloads = [_pickled(net) for net in nets] if min(len(nets), cores()) > 1 else [None] * len(nets)
    jobs = [i for i, payload in enumerate(payloads) if payload is not None]
    left = [i for i, payload in enumerate(payloads) if payload is None]
    workers = min(len(jobs), cores())
    if jobs:
        for i in jobs:  # progress is counted by the files that appear
            paths[i].unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            running = [_start(clock, [(paths[i], payloads[i]) for i in jobs[k::workers]], input_size,
                              Path(tmp) / f"jobs{k}.pkl") for k in range(workers)]
            try:
                while any(proc.poll() is None for proc, _ in running):
                    bar.update(sum(paths[i].exists() for i in jobs) - bar.n)
                    time.sleep(0.5)
            finally:  # on Ctrl-C no conversion goes on behind the caller's back
                for proc, _ in running:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            for proc, jobfile in running:
                left += _finished(proc, jobfile, jobs, paths)
    for i in left:
        clock.export(nets[i], input_size, paths[i])
    bar.update(len(nets) - bar.n)
    bar.close()


def _pickled(net: nn.Module) -> bytes | None:
    try:
        return pickle.dumps(net)
    except (pickle.PicklingError, TypeError, AttributeError):  # a lambda or a local class inside it
        return None


def _start(clock: Clock, jobs: list[tuple[Path, bytes]], input_size: int, jobfile: Path):
    with open(jobfile, "wb") as f:
        pickle.dump({"clock": clock, "input_size": input_size, "jobs": jobs, "quiet": runtimes_quiet()}, f)
    # the caller's import path, so the worker finds every class this process found
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with open(jobfile.with_suffix(".log"), "wb") as log:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-m", "compress.latency.workers", str(jobfile)], env=env,
                                stdout=log, stderr=subprocess.STDOUT), jobfile


def _finished(proc: subprocess.Popen, jobfile: Path, jobs: list[int], paths: Sequence[Path]) -> list[int]:
    """The jobs a worker left to this process (nets it could not rebuild); raises its error."""
    done = jobfile.with_suffix(".done")
    if proc.returncode != 0 or not done.exists():
        log = jobfile.with_suffix(".log").read_text(errors="replace").strip().splitlines()
        raise CompressError(f"a conversion worker failed ({proc.returncode}): {' '.join(log[-5:])[-800:]}")
    result = pickle.loads(done.read_bytes())
    if result["error"]:
        raise CompressError(result["error"])
    skipped = set(map(str, result["skipped"]))
    return [i for i in jobs if str(paths[i]) in skipped]


def main(jobfile: str) -> None:
    """A worker: convert each job's net to its file; nets it cannot rebuild are left to the caller."""
    task = pickle.loads(Path(jobfile).read_bytes())
    torch.set_num_threads(1)
    if task["quiet"]:
        quiet_runtimes()
    result = {"skipped": [], "error": None}
    for path, payload in task["jobs"]:
        try:
            net = pickle.loads(payload)
        except (ImportError, AttributeError):  # its class lives in a module only the caller has loaded
            result["skipped"].append(str(path))
            continue
        try:
            task["clock"].export(net, task["input_size"], Path(path))
        except CompressError as exc:
            result["error"] = str(exc)
            break
    done = Path(jobfile).with_suffix(".done")
    done.with_suffix(".tmp").write_bytes(pickle.dumps(result))
    done.with_suffix(".tmp").replace(done)


if __name__ == "__main__":
    main(sys.argv[1])
