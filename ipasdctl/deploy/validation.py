"""How an exported file is checked before it is published: `onnx.checker`, then its outputs against a
reference (PyTorch, or the fp32 file it was made from) on real test images at several batch sizes.

Pass iff |candidate - reference| <= atol + rtol * |reference| element-wise; the max absolute difference and
the top-1 agreement are reported either way. Each format states its own atol / rtol (formats/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import UserError, one_line
from .onnx_files import ATOL, INPUT_NAME, OUTPUT_NAME, RTOL, ort_session


class ExportValidationError(UserError):
    """The exported model disagrees with PyTorch (or fails the checker): nothing is written. Exit code 1."""

    exit_code = 1


def run_checker(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportValidationError(f"onnx.checker rejects the exported {path.name}: "
                                    f"{one_line(exc, 300, line=0, named=True)}") from None


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> dict:
    """Max |difference|, whether every element is within atol + rtol * |reference|, and top-1 agreement."""
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    bound = atol + rtol * np.abs(reference.astype(np.float64))
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "within_tolerance": bool(np.all(diff <= bound)),
        "top1_agreement": float(np.mean(candidate.argmax(1) == reference.argmax(1))),
    }


def validate_against_torch(model: torch.nn.Module, onnx_path: Path, images: np.ndarray,
                           batch_sizes: Sequence[int], atol: float = ATOL, rtol: float = RTOL,
                           session=None) -> list[dict]:
    """onnxruntime vs PyTorch on `images[:b]` for each batch size b; raises ExportValidationError past tolerance.
    `session`: the one to run (default: onnxruntime's CPU provider on `onnx_path`)."""
    session = session if session is not None else ort_session(onnx_path)
    results = []
    for b in batch_sizes:
        x = images[:b]
        with torch.no_grad():
            reference = model(torch.from_numpy(x)).float().numpy()
        candidate = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        if candidate.shape != reference.shape:
            raise ExportValidationError(f"the exported model returns shape {candidate.shape} at batch {b}, "
                                        f"PyTorch {reference.shape}; nothing was written")
        figures = {"batch_size": int(b), **compare_outputs(reference, candidate, atol, rtol)}
        results.append(figures)
        if not figures["within_tolerance"]:
            raise ExportValidationError(
                f"onnxruntime differs from PyTorch at batch {b}: max |diff| {figures['max_abs_diff']:.3g} exceeds "
                f"atol {atol:g} / rtol {rtol:g} (top-1 agreement {100 * figures['top1_agreement']:.1f}%); "
                "nothing was written — try another --opset, or report the model")
    return results


def agreement_with(reference_session, candidate_session, images: np.ndarray, batch_sizes: Sequence[int]) -> list[dict]:
    """Max |difference| and top-1 agreement of two sessions on `images[:b]` per batch size, no tolerance (INT8
    is not expected to match fp32 to 1e-4)."""
    agreement = []
    for b in batch_sizes:
        x = images[:b]
        figures = compare_outputs(reference_session.run(None, {INPUT_NAME: x})[0],
                                  candidate_session.run(None, {INPUT_NAME: x})[0])
        figures.pop("within_tolerance")
        agreement.append({"batch_size": int(b), **figures})
    return agreement
