"""LiteRT's interpreter: opening a .tflite file and running it on float images, whatever
the file's input and output types (float, or int8 with the file's scale and zero point)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from compress.logs import native_stderr_muted, runtime


def open_interpreter(path: str | Path, threads: int = 1):
    """LiteRT's interpreter for a .tflite file, tensors allocated."""
    interpreter = runtime("ai_edge_litert.interpreter")
    with native_stderr_muted():
        runner = interpreter.Interpreter(model_path=str(path), num_threads=threads)
        runner.allocate_tensors()
    return runner


def run_inputs(path: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Float outputs of a .tflite file for float `inputs` in the file's own layout, one at a
    time (the file has batch 1); an int8 input or output is (de)quantized with the file's
    scale and zero point, as a deployed caller would. The first output (a classifier's logits)."""
    return run_outputs(path, inputs)[0]


def output_details(interpreter) -> list[dict]:
    """The file's outputs in the order the model returned them (litert-torch names them
    ..._output_0, ..._output_1, ...; the tensor indices need not follow that order)."""
    def position(detail: dict) -> int:
        found = re.search(r"output_(\d+)", detail["name"])
        return int(found.group(1)) if found else detail["index"]
    return sorted(interpreter.get_output_details(), key=position)


def run_outputs(path: str | Path, inputs: np.ndarray) -> list[np.ndarray]:
    """`run_inputs` for every output of the file, in the model's order."""
    interpreter = open_interpreter(path)
    inp, outs = interpreter.get_input_details()[0], output_details(interpreter)
    results = [[] for _ in outs]
    for x in inputs:
        x = x[None]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        for out, result in zip(outs, results):
            y = interpreter.get_tensor(out["index"])
            scale, zero = out["quantization"]
            result.append((y.astype(np.float32) - zero) * scale if out["dtype"] != np.float32 else y)
    return [np.concatenate(r) for r in results]


def run_tflite(path: str | Path, images: torch.Tensor, nhwc: bool = False) -> list[np.ndarray]:
    """Every output of a .tflite model for NCHW float `images` (the file takes NHWC when `nhwc`)."""
    return run_outputs(path, (images.permute(0, 2, 3, 1) if nhwc else images).contiguous().numpy())


def io_of(path: str | Path) -> dict:
    """The file's input and output: dtype, shape and, for integer tensors, the scale and zero
    point a caller converts with (real = (q - zero_point) * scale)."""
    interpreter = open_interpreter(path)

    def describe(detail: dict) -> dict:
        scale, zero = detail["quantization"]
        quantized = detail["dtype"] != np.float32
        return {"dtype": np.dtype(detail["dtype"]).name, "shape": [int(d) for d in detail["shape"]],
                **({"scale": float(scale), "zero_point": int(zero)} if quantized else {})}
    return {"input": describe(interpreter.get_input_details()[0]),
            "output": describe(output_details(interpreter)[0])}


def input_note(report: dict) -> str:
    """How to feed and read an integer-I/O file (an export report's), in its own numbers."""
    i, o = report["input"], report["output"]
    mean, std = report["normalize"]["mean"], report["normalize"]["std"]
    return (f"integer I/O: feed {i['dtype']} q = clip(round(x / {i['scale']:.6g} + ({i['zero_point']}))) with x the "
            f"normalised image ((pixel / 255 - mean) / std, mean {mean}, std {std}, shape {i['shape']}); "
            f"logits = (q_out - ({o['zero_point']})) * {o['scale']:.6g}.")
