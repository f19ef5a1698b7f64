"""`onnx`: the evaluation network in fp32 ONNX with a dynamic batch axis, validated against PyTorch.

- Exporter: `torch.onnx.export(..., dynamo=True, dynamic_shapes=...)` (the torch.export-based exporter that
  PyTorch 2.14 recommends); when it fails, or cannot produce the requested opset, the TorchScript exporter
  (`dynamo=False`, `dynamic_axes`) is used instead and the record says which one and why.
- Validation: onnxruntime against PyTorch on real test images at batch 1, an odd batch and 64: pass iff
  |ort - torch| <= atol + rtol * |torch| element-wise (atol 1e-4, rtol 1e-3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ...errors import UserError, one_line
from .. import onnx_files
from ..onnx_files import ATOL, INPUT_NAME, OUTPUT_NAME, RTOL, opset_of, quiet_exporters
from ..validation import validate_against_torch
from .base import FORMATS, ExportFormat, ExportJob, Written


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def export_model(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: Optional[int] = None) -> dict:
    """Write `model` (eval mode) to `path` with a dynamic batch axis; the dynamo exporter first, TorchScript if
    it fails or cannot reach `opset`. Returns {"exporter", "opset", "fallback_reason"}."""
    model.eval()
    external = _parameter_bytes(model) > onnx_files.SINGLE_FILE_LIMIT_BYTES
    reason = None
    try:
        batch = torch.export.Dim("batch", min=1)
        with quiet_exporters():
            program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},),
                                        external_data=external, verbose=False)
            program.save(str(path), external_data=external)
        got = opset_of(path)
        if opset is None or got == opset:
            return {"exporter": "dynamo", "opset": got, "fallback_reason": None}
        reason = f"the dynamo exporter produced opset {got}, not the requested {opset}"
    except Exception as exc:  # the exporter raises many types; the reason goes into the json
        reason = f"dynamo exporter failed: {one_line(exc, 300, line=0, named=True)}"
    for leftover in (path, path.with_name(path.name + ".data")):
        leftover.unlink(missing_ok=True)
    try:
        with quiet_exporters():
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset or 17, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:
        raise UserError(f"ONNX export failed with both exporters ({reason}; TorchScript exporter: "
                        f"{one_line(exc, 300, line=0, named=True)}); try another --opset") from None
    return {"exporter": "torchscript", "opset": opset_of(path), "fallback_reason": reason}


@FORMATS.register
class OnnxFp32(ExportFormat):
    name = "onnx"
    suffix = ""
    precision = "fp32"
    summary_line = "fp32 ONNX, dynamic batch axis (torch.onnx dynamo exporter, TorchScript as fallback)"
    tolerance = f"against PyTorch: atol {ATOL:g} / rtol {RTOL:g} on the logits"

    def export(self, job: ExportJob, path: Path) -> Written:
        exporter = export_model(job.model, torch.from_numpy(job.images[:2]), path, job.options.opset)
        return Written(metadata={"exporter": exporter["exporter"], "opset": exporter["opset"]}, record=exporter)

    def validate(self, job: ExportJob, path: Path) -> dict:
        batches = validate_against_torch(job.model, path, job.images, job.options.validation_batch_sizes, ATOL, RTOL)
        return {"atol": ATOL, "rtol": RTOL, "provider": "CPUExecutionProvider", "images": "test set",
                "batches": batches}
