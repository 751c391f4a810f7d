"""Keeping the runtimes' own log lines (TensorFlow, absl, XNNPACK, the TFLite converter) out
of a user's terminal: they are set before those libraries load, which they do lazily."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

_quiet = False


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
