"""ONNX export with torch.onnx's torch.export-based (dynamo) exporter, checked by onnx.checker
and by ONNX Runtime against PyTorch.

Why this exporter: on torch 2.14 it is torch.onnx's default and maintained path, and it
captures the graph with torch.export, the same capture litert-torch uses for TFLite, so
one tracing path serves both formats. The TorchScript exporter also handles these CNNs
but is deprecated.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from compress.models.card import card_of
from compress.errors import CompressError
from compress.export.bias_correction import int8_ready
from compress.export.capture import for_capture
from compress.export.parity import (check_agreement, compare_outputs, output_names, reference_inputs,
                                     torch_outputs)
from compress.export.quantize import quantize_onnx
from compress.files import atomic_write_bytes
from compress.logs import native_stderr_muted, runtime
from compress.export.outputs import FlatOutputs
from compress.pruning.profile import count

DEFAULT_OPSET = 18


def check_input_size(model: nn.Module, size: int) -> torch.Tensor:
    """One example image of `size`, after checking the model runs on it."""
    x = torch.zeros(1, 3, size, size)
    try:
        with torch.no_grad():
            model.eval()(x)
    except RuntimeError as exc:
        raise CompressError(f"the model cannot take a {size}x{size} input ({str(exc).splitlines()[0][:200]}); "
                            "choose another `input_size`.") from None
    return x


def metadata(model: nn.Module) -> dict[str, str]:
    """What a deployed file should say about itself: its model card (channel config,
    preprocessing, classes), cost."""
    card = card_of(model)
    macs, params = count(model, card.input_size)
    return {"compress.card": json.dumps(card.to_dict()), "compress.arch": json.dumps(card.arch),
            "compress.config": json.dumps(card.config), "compress.macs": str(macs), "compress.params": str(params),
            "compress.input_size": str(card.input_size), "compress.num_classes": str(card.num_classes),
            "compress.mean": json.dumps(list(card.mean)), "compress.std": json.dumps(list(card.std))}


def session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session (an `onnxruntime.InferenceSession`) on `threads` threads."""
    ort = runtime("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, path: str | Path, input_size: int | None = None, dynamic_batch: bool = True,
                opset: int = DEFAULT_OPSET, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                tolerance: float | None = 1e-4, quantize: str | None = None,
                calib_images: torch.Tensor | None = None, min_agreement: float | None = None,
                bias_correction: bool = True) -> dict:
    """Write `model` (carrying a card) as ONNX, check it and compare it with PyTorch on
    `images` (or a fixed random batch; with `labels`, the accuracy of both too).

    Float: CheckFailed when the largest logit difference exceeds `tolerance`. `quantize`
    "int8": ONNX Runtime's static QDQ int8 calibrated on `calib_images` (weights made
    int8-ready first with `bias_correction`); CheckFailed when its top-1 agreement with the
    float model is under `min_agreement`.
    """
    if quantize not in (None, "int8"):
        raise CompressError(f"ONNX export takes `int8` (static QDQ, float input/output), not `{quantize}`: "
                            "int8 input/output and dynamic range are TFLite modes.")
    if quantize and (calib_images is None or len(calib_images) == 0):
        raise CompressError("`int8` needs calibration images: give real data (`calib_data`).")
    path = Path(path)
    # A model trained channels_last keeps that layout; the exporters' graph capture wants NCHW.
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    size = input_size or card_of(model).input_size
    model.card = card_of(model).replace(input_size=size)
    x = check_input_size(model, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    source = int8_ready(model, calib_images) if quantize and bias_correction else model
    names = output_names(source, x, quantize)
    if names != ["logits"]:
        source = FlatOutputs(source).eval()
    # batch 2: torch.export specializes a dimension of size 1, so a batch of 1 could not stay dynamic (ConvNeXt)
    traced = x.expand(2, -1, -1, -1).contiguous() if dynamic_batch else x
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / "float.onnx"
        try:
            # torch.export prints the whole traced graph to stderr before it raises (thousands of
            # lines for a detector); the error says what failed, --verbose shows the graph
            with contextlib.redirect_stdout(io.StringIO()), native_stderr_muted():
                torch.onnx.export(for_capture(source), (traced,), str(written), dynamo=True, opset_version=opset,
                                  verbose=False, input_names=["input"], output_names=names, external_data=False,
                                  dynamic_shapes=({0: batch},) if dynamic_batch else None)
        except Exception as exc:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch.export colours its messages
            raise CompressError(f"ONNX export failed: {type(exc).__name__}: {text[:600]}") from None
        float_bytes = written.stat().st_size
        if quantize:
            quantize_onnx(written, Path(tmp) / "int8.onnx", calib_images.numpy())
            written = Path(tmp) / "int8.onnx"
        proto = onnx.load(str(written))
        for key, value in {**metadata(model), "compress.quantize": quantize or "none"}.items():
            proto.metadata_props.add(key=key, value=value)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise CompressError(f"{path}: onnx.checker rejected the exported model: {str(exc)[:400]}") from None
        atomic_write_bytes(path, proto.SerializeToString())
    images = reference_inputs(model, images)
    sess = session(path)
    if dynamic_batch:
        got = sess.run(None, {"input": images.numpy()})
    else:
        runs = [sess.run(None, {"input": images[i:i + 1].numpy()}) for i in range(len(images))]
        got = [np.concatenate(outputs) for outputs in zip(*runs)]
    report = {"format": "onnx", "path": str(path), "bytes": path.stat().st_size, "float_bytes": float_bytes,
              "quantize": quantize, "bias_correction": bool(quantize and bias_correction), "opset": opset,
              "input_size": size, "onnxruntime": runtime("onnxruntime").__version__, "outputs": names}
    report["parity"] = compare_outputs(str(path), torch_outputs(model, images), got, names,
                                       None if quantize else tolerance, labels=labels, task=card_of(model).task,
                                       model=model, images=images)
    if quantize and min_agreement is not None:
        check_agreement(str(path), report, min_agreement, quantize)
    return report
