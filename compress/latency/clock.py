"""The clock a latency budget is judged by: one runtime (LiteRT or ONNX Runtime), float or int8
files, a thread count, on this machine or an Android phone over adb. It exports a net the way
the export stage does (without parity checks: timing only) and times the file."""
from __future__ import annotations

import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.errors import CompressError
from compress.export.latency import SLACK, measure_adb, measure_beside
from compress.export.quantize import quantize_onnx, quantize_tflite
from compress.export.tflite import write_tflite
from compress.logs import runtime

RUNTIMES = ("tflite", "onnxruntime")
SUFFIX = {"tflite": ".tflite", "onnxruntime": ".onnx"}
# how a latency model's samples are timed, recorded with it
TIMING = ("medians of turns of 10 invokes taken with the unpruned file (2 of each left out), from the turns where "
          f"the unpruned file ran within {SLACK:.0%} of its fastest, as a ratio to it")
CALIBRATION_IMAGES = 4  # int8 speed does not depend on the ranges, so a few random inputs calibrate


@dataclass(frozen=True)
class Clock:
    runtime: str = "tflite"
    threads: int = 1
    int8: bool = False
    device: str = "local"  # or adb[:SERIAL]
    runs: int = 50
    warmup: int = 5

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise CompressError(f"unknown runtime '{self.runtime}'; latency is measured on {' or '.join(RUNTIMES)}.")
        if self.device != "local" and self.runtime != "tflite":
            raise CompressError("on a phone (adb) latency is measured with TFLite's benchmark_model: use runtime "
                                "tflite.")

    def describe(self) -> str:
        return (f"{'int8' if self.int8 else 'float'} {self.runtime}, {self.threads} thread"
                f"{'s' if self.threads > 1 else ''}, {'this machine' if self.device == 'local' else self.device}")

    def identity(self) -> dict:
        """What a latency model measured on this clock is valid for: the runtime and its version,
        the file type, the thread count and the machine."""
        package = {"tflite": "ai_edge_litert", "onnxruntime": "onnxruntime"}[self.runtime]
        return {"runtime": self.runtime, "runtime_version": runtime(package).__version__,
                "dtype": "int8" if self.int8 else "float", "threads": self.threads,
                "machine": self.device if self.device != "local" else machine()}

    def measure_file(self, path: Path) -> float:
        """The file's latency (ms). Here: timed in turns with itself, the median of the turns
        near its fastest (see `measure_beside`; one session in 30 on a shared 2-core machine ran
        1.8x slower than the next on the same file). On a phone: the lower of two sessions'
        medians."""
        if self.device == "local":
            return measure_beside(path, path, self.threads, self.warmup, self.runs)["ms"]
        return min(self._session(path) for _ in range(2))

    def ratio(self, path: Path, reference: Path, fastest_ms: float | None = None) -> dict:
        """The file's time as a ratio to `reference`'s (`ratio`), the two timed in turns, from
        the turns where the reference ran near its fastest (`fastest_ms`, or this timing's fastest
        turn; see `measure_beside`); the reference's time in those turns (`reference_ms`) and its
        fastest turn now known (`fastest_ms`). On a phone, one after the other (no fastest turn)."""
        if self.device != "local":
            reference_ms = self.measure_file(reference)
            ratio = 1.0 if path == reference else self.measure_file(path) / reference_ms
            return {"ratio": ratio, "reference_ms": reference_ms, "fastest_ms": None}
        timed = measure_beside(path, reference, self.threads, self.warmup, 2 * self.runs, fastest_ms)
        return {"ratio": timed["ms"] / timed["reference_ms"], "reference_ms": timed["reference_ms"],
                "fastest_ms": timed["fastest_ms"]}

    def _session(self, path: Path) -> float:
        return measure_adb(path, self.device.partition(":")[2] or None, threads=self.threads, warmup=self.warmup,
                           runs=self.runs)["median_ms"]

    def export(self, net: nn.Module, input_size: int, path: Path) -> None:
        """Write `net` as this clock's file (float, or int8 quantized on random inputs)."""
        net = net.eval().cpu().to(memory_format=torch.contiguous_format)
        example = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        # a float file of its own per output: workers.export_all converts files side by side in one folder
        float_path = path.with_name(f"{path.stem}.float{path.suffix}") if self.int8 else path
        if self.runtime == "tflite":
            write_tflite(net, example, float_path)
        else:
            with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and much faster for timing
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (example,), str(float_path), dynamo=False, opset_version=18,
                                  input_names=["input"])
        if self.int8:
            calib = np.random.default_rng(0).standard_normal((CALIBRATION_IMAGES, *example.shape[1:]), np.float32)
            if self.runtime == "tflite":
                quantize_tflite(float_path, path, "int8", calib)
            else:
                quantize_onnx(float_path, path, calib)

def cpu() -> tuple[str, set[str]]:
    """The CPU's model name and its feature flags, as the kernel reports them."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags = set(value.split())
    except OSError:
        pass
    return name, flags


def machine() -> str:
    """This machine as a latency is tied to it: CPU model, the SIMD features that change which
    kernels run (AVX-512, VNNI, dot-product), the core count and the OS."""
    name, flags = cpu()
    simd = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve"})
    return f"{name} [{' '.join(simd)}], {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
