"""The export and latency stages: a model written as ONNX or TFLite (float or int8) and
checked against PyTorch on real images; a file timed here or on a phone over adb; the latency
table of a channel space."""
from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from compress.data.specs import check_task, sample_images, sample_labelled
from compress.errors import CompressError
from compress.export.latency import measure, measure_adb, measure_in_turns
from compress.export.onnx import export_onnx
from compress.export.tflite import export_tflite
from compress.files import atomic_write_json
from compress.models.card import card_of
from compress.pruning.space import ChannelSpace
from compress.pruning.graph import example_input
from compress.latency import LatencyModel, cached_latency_model, clock_of
from compress.settings import ExportSettings, LatencySettings, LutSettings
from compress.stages.supernets import supernet_file
from compress.supernet import load_supernet


def export(model: nn.Module, fmt: str, output: str | Path, settings: ExportSettings = ExportSettings(),
           data: str | None = None, input_size: int | None = None) -> dict:
    """Write `model` as ONNX or TFLite, float or quantized (`settings.quantize`), and check it
    against PyTorch on real, labelled images of `data` (its evaluation split; its training
    split calibrates static int8), else on a fixed random batch. Returns the export report;
    CheckFailed (carrying the report) when parity fails. Inputs are checked before any file
    is written."""
    if fmt not in ("onnx", "tflite"):
        raise CompressError(f"unknown export format '{fmt}'; choose onnx or tflite.")
    mode = settings.quantize
    if fmt == "onnx" and (settings.nhwc or settings.keep_float or mode in ("int8_io", "dynamic_range")):
        raise CompressError("`nhwc`, `int8_io`, `dynamic_range` and `keep_float` are TFLite options; an ONNX "
                            "export is float or `int8` (static QDQ with float input/output).")
    if mode in ("int8", "int8_io") and not data:
        raise CompressError(f"`{mode}` needs calibration images: give real data (`calib_data`); its training split "
                            "calibrates, its evaluation split checks parity.")
    card = card_of(model)
    size = input_size or card.input_size
    images = labels = calib = None
    if data:
        check_task(data, card.task)
        images, labels = sample_labelled(data, False, settings.parity_images, size, card.mean, card.std, seed=1)
        labels = labels if card.task == "classify" else None  # accuracy in the parity report is top-1
        if mode in ("int8", "int8_io") or (mode and settings.bias_correction):  # calibration; bias correction
            calib = sample_images(data, True, settings.calib_images, size, card.mean, card.std)
    # Agreement is enforced on real images only: on random ones a float model's top-1 is arbitrary.
    floor = settings.agreement_floor if data else settings.min_agreement
    if fmt == "onnx":
        return export_onnx(model, output, size, opset=settings.opset, images=images, labels=labels,
                           tolerance=settings.tolerance, quantize=mode, calib_images=calib, min_agreement=floor,
                           bias_correction=settings.bias_correction)
    return export_tflite(model, output, size, quantize=mode, calib_images=calib, images=images, labels=labels,
                         nhwc=settings.nhwc, tolerance=settings.tolerance, min_agreement=floor,
                         keep_float=settings.keep_float, bias_correction=settings.bias_correction)


def latency(path: str | Path, settings: LatencySettings = LatencySettings()) -> dict:
    """Time an .onnx / .tflite file here or on a phone over adb; with `settings.budget_ms`,
    `within_budget` says whether the median met it."""
    options = dict(threads=settings.threads, warmup=settings.warmup, runs=settings.runs)
    if settings.device == "local":
        result = measure(path, settings.backend, **options)
    else:
        result = measure_adb(path, settings.device.partition(":")[2] or None, binary=settings.benchmark_binary,
                             use_xnnpack=settings.xnnpack, taskset=settings.taskset, **options)
    if settings.budget_ms is not None:
        result.update(budget_ms=settings.budget_ms, within_budget=result["median_ms"] <= settings.budget_ms)
    return result


def latencies(paths: list[str | Path], settings: LatencySettings = LatencySettings()) -> list[dict]:
    """Time several files, for their ratios: here in turns (`measure_in_turns`: each file sees
    the machine the others see, where files timed one after the other on a shared machine put
    the same pruned file at 0.40x and 0.76x of the unpruned one in two runs); on a phone one
    after the other, as benchmark_model runs. No budget is checked: it may depend on the times."""
    if settings.device == "local":
        return measure_in_turns(paths, settings.backend, settings.threads, settings.warmup, settings.runs)
    return [latency(path, settings.model_copy(update={"budget_ms": None})) for path in paths]


def latency_table(model: nn.Module, space: ChannelSpace, settings: LutSettings, output: str | Path,
                  progress: bool = True) -> LatencyModel:
    """The latency model of `space` on this machine's runtime (`settings`: runtime, int8,
    threads), fitted to whole models timed at sampled configs, written to `output`: this
    machine's cached one, the model `prune --latency` judges the same space by (built when
    missing; anew with `settings.rebuild`, or with `settings.check`, then scored on that many
    random configs it never saw)."""
    fitted = cached_latency_model(model, space, clock_of(settings), settings.samples, progress,
                                  rebuild=settings.rebuild, check=settings.check)
    atomic_write_json(output, fitted.record)
    return fitted


def lut_model_space(target: nn.Module | str | Path, divisor: int = 8, min_width: float = 0.25,
                    model: nn.Module | None = None) -> tuple[nn.Module, ChannelSpace]:
    """The model and channel space a latency table is for: a supernet run folder's (`model`:
    the unpruned model of a supernet of your own architecture), or an unpruned model's own."""
    if isinstance(target, (str, Path)):
        supernet, _ = load_supernet(supernet_file(target), model=copy.deepcopy(model))
        return supernet.plain_copy().eval(), supernet.space
    model = target.eval()
    card = card_of(model)
    if card.pruned:
        raise CompressError(f"'{card.source}' is pruned; build the table for the unpruned model or its supernet.")
    return model, ChannelSpace.from_model(model, example_input(card.input_size, model), divisor=divisor,
                                          min_ratio=min_width)
