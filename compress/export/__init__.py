"""Export compressed models to ONNX and TFLite, check their outputs, and measure latency."""
from compress.export.latency import measure
from compress.export.onnx import export_onnx
from compress.export.tflite import export_tflite

__all__ = ["export_onnx", "export_tflite", "measure"]
