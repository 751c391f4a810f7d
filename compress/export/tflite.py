"""TFLite export: litert-torch converts the float model, LiteRT's own quantizer makes the
int8 modes from that file (export/quantize.py), LiteRT's interpreter checks it against PyTorch."""
from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from compress.models.card import card_of
from compress.errors import CompressError
from compress.export.bias_correction import int8_ready
from compress.export.capture import for_capture
from compress.export.litert import io_of, run_tflite
from compress.export.onnx import check_input_size
from compress.export.parity import (check_agreement, compare_outputs, output_names, reference_inputs,
                                     torch_outputs)
from compress.export.quantize import calibrate, op_label, quantize_tflite, sensitive_ops
from compress.files import atomic_write_bytes
from compress.logs import native_stderr_muted, runtime
from compress.export.outputs import FlatOutputs


def convert(module: nn.Module, args: tuple, **kwargs):
    litert_torch = runtime("litert_torch")
    try:
        with contextlib.redirect_stdout(io.StringIO()), native_stderr_muted():  # per-pass progress, converter logs
            return litert_torch.convert(module, args, **kwargs)
    except Exception as exc:
        text = str(exc)
        ops = sorted(set(re.findall(r"aten[.:]+\w+(?:\.\w+)?", text)))
        where = f" (ops named in the error: {', '.join(ops)})" if ops else ""
        raise CompressError(f"litert-torch could not convert the model{where}: {type(exc).__name__}: "
                            f"{text.strip()[:800]}") from None


def write_tflite(module: nn.Module, example: torch.Tensor, path: str | Path) -> None:
    """Convert `module` and write the float file, the converter's logs muted."""
    edge = convert(for_capture(module), (example,))
    with contextlib.redirect_stdout(io.StringIO()), native_stderr_muted():
        edge.export(str(path))


def export_tflite(model: nn.Module, path: str | Path, input_size: int | None = None, quantize: str | None = None,
                  calib_images: torch.Tensor | None = None, images: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None, nhwc: bool = False, tolerance: float | None = 1e-4,
                  min_agreement: float | None = None, keep_float: int = 0, bias_correction: bool = True) -> dict:
    """Write `model` (carrying a card) as .tflite and compare it with PyTorch on `images`
    (with `labels`, the accuracy of both too).

    Float: parity is the largest logit difference (CheckFailed past `tolerance`).
    `quantize` (int8, int8_io, dynamic_range): the float file quantized by LiteRT's
    quantizer, static modes calibrated on `calib_images`, the `keep_float` most sensitive ops
    left in float, weights made int8-ready with `bias_correction` when there are calibration
    images; parity is top-1 agreement with the float PyTorch model (CheckFailed under
    `min_agreement`). `nhwc` makes the file take NHWC input.
    """
    litert_torch = runtime("litert_torch")
    path = Path(path)
    # A model trained channels_last keeps that layout; the exporters' graph capture wants NCHW.
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    size = input_size or card_of(model).input_size
    model.card = card_of(model).replace(input_size=size)
    x = check_input_size(model, size)
    static = quantize in ("int8", "int8_io")
    if static and (calib_images is None or len(calib_images) == 0):
        raise CompressError(f"`{quantize}` needs calibration images: give real data (`calib_data`).")
    module, example = model, x
    names = output_names(model, x, quantize)
    if names != ["logits"]:
        module = FlatOutputs(model).eval()
    if quantize and bias_correction and calib_images is not None:
        module = int8_ready(model, calib_images)
    if nhwc:
        module, example = litert_torch.to_channel_last_io(module, args=[0]).eval(), x.permute(0, 2, 3, 1).contiguous()
    kept: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        float_file = Path(tmp) / "float.tflite"
        write_tflite(module, example, float_file)
        float_bytes = float_file.stat().st_size
        if quantize:
            calibration = None
            if static:
                calib = (calib_images.permute(0, 2, 3, 1) if nhwc else calib_images).contiguous().numpy()
                calibration = calibrate(float_file, calib)
                kept = (sensitive_ops(float_file, calib, keep_float, quantize, calibration=calibration)
                        if keep_float else [])
            quantize_tflite(float_file, path, quantize, keep_float=kept, calibration=calibration)
        else:
            atomic_write_bytes(path, float_file.read_bytes())
    images = reference_inputs(model, images)
    reference = torch_outputs(model, images)
    got = run_tflite(path, images, nhwc=nhwc)
    litert_version = runtime("ai_edge_litert").__version__
    params = sum(p.numel() for p in model.parameters())
    report = {"format": "tflite", "path": str(path), "bytes": path.stat().st_size, "float_bytes": float_bytes,
              "quantize": quantize, "keep_float": [op_label(scope) for scope in kept],
              "bias_correction": bool(quantize and bias_correction and calib_images is not None), "nhwc": nhwc, "input_size": size,
              "bytes_per_float32_param": round(path.stat().st_size / (4 * params), 4), "litert": litert_version}
    report.update(io_of(path), normalize={"mean": list(model.card.mean), "std": list(model.card.std)})
    report["outputs"] = names
    report["parity"] = compare_outputs(str(path), reference, got, names, None if quantize else tolerance,
                                       labels=labels, task=card_of(model).task,
                                       model=model, images=images)
    if quantize and min_agreement is not None:
        check_agreement(str(path), report, min_agreement, quantize)
    return report
