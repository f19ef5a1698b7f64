"""Deployment: ONNX export validated against PyTorch, INT8 quantisation, latency. Reads run folders through
runs/ and builds the network from models; imports nothing of training or methods (import-linter checks it)."""

from .bench import bench
from .export import ExportValidationError, export_onnx
from .onnx_files import check_onnx_file, onnx_test_accuracy, onnx_test_data, ort_session, read_metadata, session_batches

__all__ = ["ExportValidationError", "bench", "check_onnx_file", "export_onnx", "onnx_test_accuracy", "onnx_test_data",
           "ort_session", "read_metadata", "session_batches"]
