"""Deployment: ONNX export validated against PyTorch, INT8 quantisation, latency. Reads run folders through
runs.py and builds the network from models; imports nothing of training or methods (import-linter checks it)."""

from .bench import bench
from .export import ExportValidationError, export_onnx
from .onnx_files import check_onnx_file, onnx_test_accuracy, read_metadata

__all__ = ["ExportValidationError", "bench", "check_onnx_file", "export_onnx", "onnx_test_accuracy", "read_metadata"]
