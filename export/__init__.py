"""Export compressed models to ONNX and TFLite, check their outputs, and measure latency."""
from export.latency import measure
from export.onnx import export_onnx
from export.tflite import export_tflite

__all__ = ["export_onnx", "export_tflite", "measure"]
