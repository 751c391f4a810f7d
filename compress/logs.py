"""Keeping the runtimes' own log lines (TensorFlow, absl, XNNPACK, the TFLite converter) out
of a user's terminal: they are set before those libraries load, which they do lazily."""
from __future__ import annotations

import logging
import os
import warnings


def quiet_runtimes() -> None:
    """Silence the C++ and Python loggers of the TensorFlow/LiteRT stack and PyTorch's
    deprecation notices; `chansearch --verbose` or COMPRESS_DEBUG=1 skip this."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ INFO/WARNING/ERROR lines
    os.environ.setdefault("GLOG_minloglevel", "3")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    for name in ("absl", "tensorflow", "litert_torch", "ai_edge_litert", "jax", "torch._dynamo", "torch.export",
                 "torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.utils\._pytree")
