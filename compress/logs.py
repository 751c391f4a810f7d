"""Keeping the runtimes' own log lines (TensorFlow, absl, XNNPACK, the TFLite converter) out
of a user's terminal: they are set before those libraries load, which they do lazily."""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

from compress.errors import CompressError

_quiet = False
notes = logging.getLogger("compress")  # what a run tells its user in passing (a re-initialized head)


def show_notes(stream=None) -> None:
    """Print the library's notes as plain lines of the run's own output (the CLI does this;
    a Python program sees them through `logging` as it configures it)."""
    if not notes.handlers:
        handler = logging.StreamHandler(stream or sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        notes.addHandler(handler)
        notes.setLevel(logging.INFO)
        notes.propagate = False


def quiet_runtimes() -> None:
    """Silence the C++ and Python loggers of the TensorFlow/LiteRT stack and PyTorch's
    deprecation notices; `chansearch --verbose` or COMPRESS_DEBUG=1 skip this."""
    global _quiet
    _quiet = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ INFO/WARNING/ERROR lines
    os.environ.setdefault("GLOG_minloglevel", "3")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    for name in ("absl", "tensorflow", "litert_torch", "ai_edge_litert", "jax", "torch._dynamo", "torch.export",
                 "torch.onnx", "torch.utils._pytree", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.utils\._pytree")


def runtimes_quiet() -> bool:
    """Whether quiet_runtimes() ran in this process (a worker process it starts must run it too)."""
    return _quiet


@contextlib.contextmanager
def native_stderr_muted() -> Iterator[None]:
    """After quiet_runtimes(): silence what native code writes straight to file descriptor 2
    (LiteRT's "Created TensorFlow Lite XNNPACK delegate" line has no log level to set).
    Python's own stderr is untouched, so errors raised inside still reach the user."""
    if not _quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def runtime(name: str) -> ModuleType:
    """Import a runtime package (LiteRT, its converter and quantizer, ONNX Runtime) with
    native stderr muted: some builds log from the static initialisers of their shared
    libraries as they load (litert-converter 0.5's "oneDNN custom operations are on"), which
    no log level set from Python reaches, so the import itself is where to mute them."""
    with native_stderr_muted(), warnings.catch_warnings():
        if _quiet:
            warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            raise CompressError(f"the runtime package {name.replace('_', '-')} is not installed here "
                                f"({platform.system()} {platform.machine()}): `pip install {name.replace('_', '-')}`. "
                                "litert-torch, the TFLite converter, ships no wheels for Linux aarch64: export ONNX "
                                "there (--format onnx), or convert on x86_64 Linux or macOS.") from None


@contextlib.contextmanager
def heartbeat(what: str, every: float = 30.0) -> Iterator[None]:
    """A note every `every` seconds while a step that shows no progress of its own runs (a
    large model's dependency graph), so that a long wait is not mistaken for a hang."""
    import threading
    import time
    done = threading.Event()
    began = time.monotonic()

    def beat() -> None:
        while not done.wait(every):
            notes.info(f"{what}: still running after {time.monotonic() - began:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
