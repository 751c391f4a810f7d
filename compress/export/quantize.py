"""Post-training int8 quantization of an exported float file: TFLite through LiteRT's own
quantizer (ai-edge-quantizer), ONNX through ONNX Runtime's static QDQ quantizer. Both give
per-channel int8 weights; static modes calibrate int8 activations on real images.

Why quantize the exported file rather than the PyTorch graph (PT2E): the converters are
the runtimes' own, so the file holds exactly the kernels the runtime was tuned for, and
litert-torch 0.10's PT2E path gave MobileNetV2 files that disagreed with the float model.
"""
from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from compress.errors import CompressError
from compress.export.litert import open_interpreter, run_inputs
from compress.files import atomic_write_bytes
from compress.logs import native_stderr_muted, runtime

MODES = ("int8", "int8_io", "dynamic_range")  # ExportSettings documents each


def calibrate(float_file: str | Path, calib: np.ndarray) -> dict:
    """Min/max of every tensor of the float file over `calib` (inputs in its layout): what
    every static quantization of that file, sensitivity trials included, is made from.

    LiteRT's calibrator averages each tensor's per-image range, which clips a tensor's rare
    extremes. For the output that clips exactly the top logits, tying the classes top-1 is
    decided between (on a CIFAR-10 MobileNetV2 it was the largest int8 error of any tensor),
    and for the input every saturated pixel; so the graph's input and output take the whole
    range they have on `calib`."""
    quantizer, Op = _quantizer()
    q = quantizer.Quantizer(str(float_file))
    q.add_static_config(".*", Op.ALL_SUPPORTED, 8, 8)
    interpreter = open_interpreter(float_file)
    signatures = interpreter.get_signature_list()
    key = next(iter(signatures))
    name = signatures[key]["inputs"][0]
    with native_stderr_muted(), _no_progress():
        ranges = q.calibrate({key: [{name: x[None]} for x in calib]}, num_threads=torch.get_num_threads())
    ends = {interpreter.get_input_details()[0]["name"]: calib,
            interpreter.get_output_details()[0]["name"]: run_inputs(float_file, calib)}
    for tensor, values in ends.items():
        if tensor in ranges:
            ranges[tensor] = {"min": np.minimum(ranges[tensor]["min"], values.min()),
                              "max": np.maximum(ranges[tensor]["max"], values.max())}
    return ranges


def _quantizer():
    """ai-edge-quantizer's Quantizer module and its op names."""
    return runtime("ai_edge_quantizer.quantizer"), runtime("ai_edge_quantizer.qtyping").TFLOperationName


@contextlib.contextmanager
def _no_progress():
    """ai-edge-quantizer draws its own progress bars; ours (when any) are the ones to show."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def quantize_tflite(float_file: str | Path, output: str | Path, mode: str, calib: np.ndarray | None = None,
                    keep_float: Sequence[str] = (), calibration: dict | None = None) -> None:
    """Quantize a float .tflite with ai-edge-quantizer into `output`.

    `calib`: calibration inputs in the file's own layout (N, ...), needed by the static
    modes (or their `calibration`, already measured). `keep_float`: scopes (output tensor
    names) of ops to leave in float, the sensitive ones.
    """
    quantizer, Op = _quantizer()
    if mode not in MODES:
        raise CompressError(f"unknown quantization mode '{mode}'; choose one of {', '.join(MODES)}.")
    float_file = Path(float_file)
    q = quantizer.Quantizer(str(float_file))
    if mode == "dynamic_range":
        q.add_dynamic_config(".*", Op.ALL_SUPPORTED, 8)
    else:
        if calibration is None and (calib is None or len(calib) == 0):
            raise CompressError(f"`{mode}` quantization needs calibration images.")
        q.add_static_config(".*", Op.ALL_SUPPORTED, 8, 8)
        if mode == "int8":  # float in and out: a drop-in replacement for the float file
            q.add_static_config(".*", Op.INPUT, 8, 8, algorithm_key="no_quantize")
            q.add_static_config(".*", Op.OUTPUT, 8, 8, algorithm_key="no_quantize")
        for scope in keep_float:
            q.add_static_config(f"^{re.escape(scope)}$", Op.ALL_SUPPORTED, 8, 8, algorithm_key="no_quantize")
        calibration = calibration if calibration is not None else calibrate(float_file, calib)
    with native_stderr_muted(), _no_progress():
        model = q.quantize(calibration if mode != "dynamic_range" else None,
                           enable_progress_report=False).quantized_model
    atomic_write_bytes(output, bytes(model))


WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def weighted_ops(float_file: Path) -> list[str]:
    """Scopes (as the quantizer's recipes match them) of the ops that carry weights."""
    fb = runtime("ai_edge_quantizer.utils.tfl_flatbuffer_utils")
    model = fb.read_model(Path(float_file))
    graph = model.subgraphs[0]
    return [fb.get_op_scope(op, graph.tensors) for i, op in enumerate(graph.operators)
            if fb.get_op_name_by_index(model, 0, i) in WEIGHTED_OPS]


def op_label(scope: str) -> str:
    """A readable name for an op scope: the PyTorch module path litert-torch encodes in its
    output tensors' names (`features.12.conv.2`, the conv rather than the BN folded into it);
    the op writing the graph's output (its tensor is named for the signature) is the
    "output layer"."""
    names = [n for n in scope.split(";") if n]
    weighted = [n for n in names if re.search(r"\.(Conv2d|Linear)_[^/]*$", n)]
    parts = (weighted or names or [scope])[0].split("/")[1:]
    path = [part.rsplit("_", 1)[1] for part in parts if "_" in part]
    if path and len(path) == len(parts):
        return ".".join(path)
    first = (names or [scope])[0]
    return "output layer" if first.startswith("serving_default_output") else first


def sensitive_ops(float_file: str | Path, calib: np.ndarray, count: int, mode: str = "int8",
                  probe: int = 64, calibration: dict | None = None) -> list[str]:
    """The `count` weighted ops whose int8 error costs the output most, measured end to end:
    the file quantized with every op but one, its logits on `probe` calibration images
    compared with the float file's; the ops whose float copy brings the output closest rank
    first (per-layer sensitivity as AIMET and FastNAS measure it)."""
    float_file = Path(float_file)
    calibration = calibration if calibration is not None else calibrate(float_file, calib)
    images = calib[:probe]
    reference = run_inputs(float_file, images)
    scale = float(np.mean(reference ** 2)) or 1.0
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "trial.tflite"
        for scope in tqdm(weighted_ops(float_file), desc="int8 sensitivity", unit="op", leave=False, disable=None):
            quantize_tflite(float_file, trial, mode, keep_float=[scope], calibration=calibration)
            errors[scope] = float(np.mean((run_inputs(trial, images) - reference) ** 2)) / scale
    return sorted(errors, key=errors.get)[:count]


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over in-memory images."""

    def __init__(self, name: str, images: Iterable[np.ndarray]):
        self.name, self.images = name, iter(images)

    def get_next(self) -> dict | None:
        x = next(self.images, None)
        return None if x is None else {self.name: x[None]}


def quantize_onnx(float_file: str | Path, output: str | Path, calib: np.ndarray) -> None:
    """Static QDQ int8 with ONNX Runtime: per-channel symmetric int8 weights, int8
    activations from min/max on `calib` (NCHW), float input and output."""
    q = runtime("onnxruntime.quantization")
    quant_pre_process = runtime("onnxruntime.quantization.shape_inference").quant_pre_process
    if calib is None or len(calib) == 0:
        raise CompressError("ONNX int8 needs calibration images.")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Folds and shape-infers first, as ONNX Runtime's quantization guide asks.
        with contextlib.redirect_stdout(io.StringIO()), native_stderr_muted():
            quant_pre_process(str(float_file), str(prepared))
            q.quantize_static(str(prepared), str(Path(tmp) / "q.onnx"), _Reader("input", calib),
                              quant_format=q.QuantFormat.QDQ, per_channel=True, activation_type=q.QuantType.QInt8,
                              weight_type=q.QuantType.QInt8, calibrate_method=q.CalibrationMethod.MinMax)
        atomic_write_bytes(output, (Path(tmp) / "q.onnx").read_bytes())
