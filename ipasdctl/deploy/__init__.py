"""Deployment: export in every registered format (formats/: ONNX fp32, INT8, fp16) validated against PyTorch,
latency. Reads run folders through runs/ and builds the network from models; imports nothing of training or
methods (import-linter checks it)."""

from .bench import bench
from .export import ExportValidationError, export_onnx
from .formats import FORMATS, model_session, onnx_test_accuracy
from .onnx_files import check_onnx_file, onnx_test_data, ort_session, read_metadata, session_batches

__all__ = ["FORMATS", "ExportValidationError", "bench", "check_onnx_file", "export_onnx", "model_session",
           "onnx_test_accuracy", "onnx_test_data", "ort_session", "read_metadata", "session_batches"]
