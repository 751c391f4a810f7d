"""TFLite export with litert-torch (float, or int8 post-training quantization through
PT2E with per-channel weights), checked in LiteRT's interpreter against PyTorch."""
from __future__ import annotations

import contextlib
import copy
import io
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.card import card_of
from compress.errors import CheckFailed, CompressError
from compress.export.onnx import check_input_size
from compress.export.parity import compare, reference_inputs, torch_logits
from compress.logs import native_stderr_muted


def open_interpreter(path: str | Path, threads: int = 1):
    """LiteRT's interpreter for a .tflite file, tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter
    with native_stderr_muted():
        runner = Interpreter(model_path=str(path), num_threads=threads)
        runner.allocate_tensors()
    return runner


def run_tflite(path: str | Path, images: torch.Tensor, nhwc: bool = False) -> np.ndarray:
    """Logits of a .tflite model for NCHW float `images`, one image at a time (the file
    has batch 1); int8 inputs/outputs are (de)quantized with the file's parameters."""
    interpreter = open_interpreter(path)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for image in images:
        x = image[None].permute(0, 2, 3, 1).numpy() if nhwc else image[None].numpy()
        scale, zero = inp["quantization"]
        if inp["dtype"] != np.float32:
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])
        scale, zero = out["quantization"]
        results.append((y.astype(np.float32) - zero) * scale if out["dtype"] != np.float32 else y)
    return np.concatenate(results)


def convert(module: nn.Module, args: tuple, **kwargs):
    import litert_torch
    try:
        with contextlib.redirect_stdout(io.StringIO()), native_stderr_muted():  # per-pass progress, converter logs
            return litert_torch.convert(module, args, **kwargs)
    except Exception as exc:
        text = str(exc)
        ops = sorted(set(re.findall(r"aten[.:]+\w+(?:\.\w+)?", text)))
        where = f" (ops named in the error: {', '.join(ops)})" if ops else ""
        raise CompressError(f"litert-torch could not convert the model{where}: {type(exc).__name__}: "
                            f"{text.strip()[:800]}") from None


def _quantized(model: nn.Module, example: torch.Tensor, calib_images: torch.Tensor):
    """PT2E static int8: per-channel symmetric weights, activations calibrated on images."""
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    graph = torch.export.export(model, (example,)).module()
    graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for image in calib_images:  # the exported graph has batch 1
            graph(image[None])
    graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
    return graph, QuantConfig(pt2e_quantizer=quantizer)


def export_tflite(model: nn.Module, path: str | Path, input_size: int | None = None, int8: bool = False,
                  calib_images: torch.Tensor | None = None, images: torch.Tensor | None = None,
                  nhwc: bool = False, tolerance: float | None = 1e-4, min_agreement: float | None = None) -> dict:
    """Write `model` (carrying a card) as .tflite and compare it with PyTorch.

    Float: parity is the largest logit difference (CheckFailed past `tolerance`). int8:
    needs `calib_images`; parity is top-1 agreement with the float PyTorch model on
    `images` (CheckFailed under `min_agreement`). `nhwc` makes the file take NHWC input.
    """
    import litert_torch
    path = Path(path)
    model = copy.deepcopy(model).cpu().eval()
    size = input_size or card_of(model).input_size
    model.card = card_of(model).replace(input_size=size)
    x = check_input_size(model, size)
    if int8 and (calib_images is None or len(calib_images) == 0):
        raise CompressError("`int8` needs calibration images: give `calib_data` (and `calib_images`).")
    module, example = model, x
    if nhwc:
        module, example = litert_torch.to_channel_last_io(model, args=[0]).eval(), x.permute(0, 2, 3, 1).contiguous()
    kwargs = {}
    if int8:
        module, quant = _quantized(module, example, calib_images.permute(0, 2, 3, 1) if nhwc else calib_images)
        kwargs["quant_config"] = quant
    edge = convert(module, (example,), **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()), native_stderr_muted():
        edge.export(str(path))
    images = reference_inputs(model, images)
    reference = torch_logits(model, images)
    got = run_tflite(path, images, nhwc=nhwc)
    from ai_edge_litert import __version__ as litert_version
    params = sum(p.numel() for p in model.parameters())
    report = {"format": "tflite", "path": str(path), "bytes": path.stat().st_size, "int8": int8, "nhwc": nhwc,
              "input_size": size, "bytes_per_float32_param": round(path.stat().st_size / (4 * params), 4),
              "litert": litert_version}
    report["parity"] = compare(str(path), reference, got, None if int8 else tolerance)
    if int8 and min_agreement is not None and report["parity"]["top1_agreement"] < min_agreement:
        raise CheckFailed(f"{path}: int8 top-1 agrees with the float model on "
                          f"{report['parity']['top1_agreement']:.1%} of {len(images)} images, under the "
                          f"required {min_agreement:.1%}. Calibrate on more images (`calib_images`).")
    return report
