"""Files a run writes and reads: atomic writes (temp file, fsync, rename), the weights-only
torch load, and a lock that keeps two runs out of one folder."""
from __future__ import annotations

import fcntl
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from compress.errors import CompressError

CHECKPOINT_FORMAT = "compress.checkpoint"


def _atomic(path: str | Path, write) -> None:
    """Call `write(binary_file)` on a temp file beside `path`, fsync, then rename over it: a
    crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a run's files get the usual mode
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj, path: str | Path) -> None:
    """torch.save, atomically."""
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_figure(path: str | Path, fig) -> None:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


def safe_torch_load(path: str | Path):
    """torch.load with weights_only=True, turning every failure into a message naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"checkpoint '{path}' does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CompressError(f"'{path}' holds pickled Python objects that a weights-only load refuses "
                            f"({str(exc).splitlines()[0][:200]}); compress never unpickles code. Save "
                            "the model's state_dict() instead.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CompressError(f"'{path}' is not a readable PyTorch file: it is truncated, corrupt "
                            f"or of another format ({type(exc).__name__}: {str(exc)[:200]}).") from None


class RunLock:
    """An exclusive lock on a run folder for as long as a run writes into it (an flock on
    `DIR/.lock`, released by the OS when the process dies, so a crash never leaves it held)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CompressError(f"run folder '{self.folder}' is in use by another running process; wait for it "
                                "to finish, or choose another folder.") from None
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
