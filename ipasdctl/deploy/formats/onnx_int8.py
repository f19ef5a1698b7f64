"""`onnx-int8`: static INT8 (QDQ, per-channel weights) of the fp32 ONNX file, for the CPU it will run on.

`quant_pre_process` (shape inference + graph optimisation, which folds BatchNorm into convolutions), then
`quantize_static` with MinMax ranges calibrated on training images (normalised, not augmented), with the
types and operators chosen for the target CPU (deploy/int8.py). Validated against the fp32 file it was made
from: INT8 is not expected to match to 1e-4, so the max |difference| and the top-1 agreement are reported,
and its own test top-1 stands beside fp32's. A quick p50 at batch 1 of both files says whether INT8 is faster
than fp32 on this CPU (`int8_pays`).
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from ..int8 import calibration_batches, choose_settings, quantize_int8
from ..onnx_files import ort_session
from ..timing import int8_speed_check
from ..validation import agreement_with
from .base import FORMATS, ExportFormat, ExportJob, ExportOptions, Written, batchnorm_count


@FORMATS.register
class OnnxInt8(ExportFormat):
    name = "onnx-int8"
    suffix = "-int8"
    precision = "int8"
    made_from = "onnx"
    summary_line = ("static INT8 QDQ of the fp32 file, per-channel weights, calibrated on training images, "
                    "types for the target CPU (--int8-target)")
    tolerance = "against the fp32 file: max |diff| and top-1 agreement reported, no tolerance"

    def check(self, options: ExportOptions) -> None:
        if options.opset is not None and options.opset < 13:
            raise UserError(f"--int8 needs --opset 13 or newer (per-channel QDQ), got {options.opset}")
        if options.calib_samples <= 0:
            raise UserError(f"--calib-samples must be positive, got {options.calib_samples}")

    def settings(self, options: ExportOptions) -> dict:
        return {"int8": True, "calib_samples": options.calib_samples, "int8_target": options.int8_target}

    def export(self, job: ExportJob, path: Path) -> Written:
        source = job.source_of(self).path
        settings = choose_settings(job.options.int8_target)
        quantization = quantize_int8(source, path, calibration_batches(job.data, job.options.calib_samples),
                                     job.staging, settings)
        quantization["batchnorm_folded"] = batchnorm_count(job.model) - quantization["batchnorm_left_float"]
        (job.staging / f"{source.stem}-preprocessed.onnx").unlink(missing_ok=True)
        described = (f"static {settings.describe()}, MinMax on {quantization['calibration_samples']} "
                     "training images")
        return Written(metadata={"quantization": described, "int8_target": settings.target,
                                 "quantization_settings": quantization,
                                 "calibration_samples": quantization["calibration_samples"]},
                       record={"quantization": quantization, "quantization_summary": settings.describe()})

    def validate(self, job: ExportJob, path: Path) -> dict:
        source = job.source_of(self).path
        batches = agreement_with(ort_session(source), ort_session(path), job.images,
                                 job.options.validation_batch_sizes)
        return {"reference": f"{source.name} (onnxruntime)", "images": "test set", "batches": batches}

    def finish(self, job: ExportJob, path: Path, record: dict) -> Written:
        speed = int8_speed_check(job.source_of(self).path, path, job.images[:1])
        return Written(metadata={"int8_speed_check": speed}, record={"speed_check": speed})

    def summary(self, record: dict) -> dict:
        return {**super().summary(record), "target": record["quantization"]["target"],
                "quantization": record["quantization_summary"], "pays": record["speed_check"]["int8_pays"],
                "speed_check": record["speed_check"]}
