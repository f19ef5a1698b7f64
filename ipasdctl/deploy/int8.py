"""Static INT8 quantisation of an exported model for the CPU it will run on: calibration on training images,
QDQ with per-channel weights after onnxruntime's pre-processing (which folds every BatchNorm that follows a
convolution into it).

The settings follow onnxruntime's guidance for CPU inference (its `quantize_static` docstring and its
quantization guide) and what this machine measured (docs/performance.md, section 5):

| target | activations | weights | reduce_range | why |
|---|---|---|---|---|
| `avx2` (x86 without VNNI) | uint8 | int8 | yes | U8S8 uses VPMADDUBSW, which can saturate: 7-bit weights avoid it |
| `avx512-vnni` (x86 with VNNI) | uint8 | int8 | no | VNNI accumulates without saturation; S8S8 is 3x slower |
| `arm64` | int8 | int8 | no | ARM's dot-product kernels run S8S8 natively (onnxruntime's QDQ default) |

Quantised operators: the ones that pay, Conv, Gemm and MatMul, plus the two that are free with asymmetric
activations: a Relu or Clip right after a quantised operator disappears into its output's Quantize (the
clamp is the activation), and an Add between two quantised tensors runs as QLinearAdd instead of
DQ-Add-Q. Everything else stays float, in particular a BatchNorm that could not be folded (a pre-activation
BN after a residual Add): wrapping it in Q/DQ costs more than it saves and per-channel quantisation of its
1-D scale is refused by onnxruntime ("Axis 1 is out-of-range").
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .. import runtime
from ..data import RandomBatches
from ..errors import UserError, one_line
from . import onnx_files
from .onnx_files import INPUT_NAME, count_ops, file_size, quiet_exporters

TARGETS = ("auto", "avx2", "avx512-vnni", "arm64")
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
# free with asymmetric activations: Relu/Clip fold into the producer's Quantize, Add runs as QLinearAdd
FUSED_OPS = ("Relu", "Clip", "Add")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")  # Linux names; AVX-VNNI is the 256-bit form (Alder Lake and later)
ARM_MACHINES = ("aarch64", "arm64", "armv8l")


@dataclass(frozen=True)
class Int8Settings:
    """What `quantize_static` is given for one target CPU, and why (everything here goes into the json)."""

    target: str
    detected_from: str
    activation_type: str
    weight_type: str
    reduce_range: bool
    op_types: tuple[str, ...]
    per_channel: bool = True
    quant_format: str = "QDQ"
    calibrate_method: str = "MinMax"
    extra_options: dict = field(default_factory=dict)
    reason: str = ""

    @property
    def short(self) -> str:
        """'U8S8' and friends: the activation and weight types in onnxruntime's shorthand."""
        kind = {"QUInt8": "U8", "QInt8": "S8"}
        return kind[self.activation_type] + kind[self.weight_type]

    def describe(self) -> str:
        return (f"{self.target} target: {self.short} ({self.activation_type} activations, {self.weight_type} "
                f"per-channel weights{', 7-bit (reduce_range)' if self.reduce_range else ''}), "
                f"{self.quant_format}, {'/'.join(self.op_types)} quantised")

    def record(self) -> dict:
        out = asdict(self)
        out["op_types"] = list(self.op_types)
        out["format"] = self.short
        return out


def detect_target(machine: Optional[str] = None, flags: Optional[frozenset[str]] = None) -> tuple[str, str]:
    """(target, evidence) for this CPU: arm64 from `platform.machine()`, else avx512-vnni when /proc/cpuinfo
    lists VNNI, else avx2 (also where the flags cannot be read: 7-bit weights are safe on every x86)."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine in ARM_MACHINES:
        return "arm64", f"platform.machine() = {machine}"
    flags = runtime.cpu_flags() if flags is None else frozenset(flags)
    vnni = sorted(f for f in VNNI_FLAGS if f in flags)
    if vnni:
        return "avx512-vnni", f"CPU flags list {', '.join(vnni)}"
    if not flags:
        return "avx2", f"{machine or 'unknown'} CPU whose flags cannot be read: the settings safe on every x86"
    return "avx2", "CPU flags list avx2 but no VNNI" if "avx2" in flags else "CPU flags list neither avx2 nor VNNI"


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise UserError(f"unknown --int8-target '{target}'; known targets: {', '.join(TARGETS)}")
    return target


def choose_settings(target: str = "auto", machine: Optional[str] = None,
                    flags: Optional[frozenset[str]] = None) -> Int8Settings:
    """The quantisation settings for `target` (one of TARGETS; auto = this CPU's, see detect_target)."""
    check_target(target)
    detected_from = "--int8-target"
    if target == "auto":
        target, detected_from = detect_target(machine, flags)
        detected_from = f"auto: {detected_from}"
    op_types = COMPUTE_OPS + FUSED_OPS
    if target == "avx2":
        return Int8Settings(target, detected_from, "QUInt8", "QInt8", True, op_types,
                            reason="x86 without VNNI: U8S8 (VPMADDUBSW) with 7-bit weights against its saturation")
    if target == "avx512-vnni":
        return Int8Settings(target, detected_from, "QUInt8", "QInt8", False, op_types,
                            reason="x86 with VNNI: U8S8 without saturation, no range reduction; S8S8 measured "
                                   "3x slower")
    return Int8Settings(target, detected_from, "QInt8", "QInt8", False, op_types,
                        reason="ARM64: S8S8 runs natively on the dot-product kernels (onnxruntime's QDQ default)")


def calibration_batches(data, samples: int, batch_size: int = 64, seed: int = 0) -> Iterator[np.ndarray]:
    """`samples` training images (a seeded random choice), normalised and not augmented, in batches."""
    if samples <= 0:
        raise UserError(f"--calib-samples must be positive, got {samples}")
    samples = min(samples, data.num_train)
    plan = RandomBatches(data.train_labels, min(batch_size, samples), seed)
    loader = data.train_loader(plan, seed, torch.device("cpu"), False, False)
    given = 0
    for batch in loader.epoch(0):
        x = batch.images[: samples - given]
        given += x.shape[0]
        yield np.ascontiguousarray(x.float().numpy())
        if given >= samples:
            return


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: Iterator[np.ndarray], work_dir: Path,
                  settings: Optional[Int8Settings] = None) -> dict:
    """Static INT8 with `settings` (default: this CPU's) after onnxruntime's pre-processing; returns the
    settings, how many BatchNorms are left float (not foldable) and the number of calibration images."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    settings = settings or choose_settings()

    class Reader(CalibrationDataReader):
        def __init__(self, batches):
            self.batches = iter(batches)
            self.count = 0

        def get_next(self):
            x = next(self.batches, None)
            if x is None:
                return None
            self.count += x.shape[0]
            return {INPUT_NAME: x}

    pre_path = work_dir / f"{fp32_path.stem}-preprocessed.onnx"
    external = file_size(fp32_path) > onnx_files.SINGLE_FILE_LIMIT_BYTES
    with quiet_exporters():
        try:
            quant_pre_process(str(fp32_path), str(pre_path), save_as_external_data=external,
                              all_tensors_to_one_file=True)
        except Exception as exc:
            raise UserError("onnxruntime's quantization pre-processing failed: "
                            f"{one_line(exc, 300, line=0, named=True)}") from None
        left_float = count_ops(pre_path, "BatchNormalization")  # neither the exporter nor ORT could fold them
        reader = Reader(calibration)
        try:
            quantize_static(str(pre_path), str(int8_path), reader, quant_format=QuantFormat[settings.quant_format],
                            op_types_to_quantize=list(settings.op_types), per_channel=settings.per_channel,
                            reduce_range=settings.reduce_range,
                            activation_type=QuantType[settings.activation_type],
                            weight_type=QuantType[settings.weight_type],
                            calibrate_method=CalibrationMethod[settings.calibrate_method],
                            use_external_data_format=external, calibration_providers=["CPUExecutionProvider"],
                            extra_options=dict(settings.extra_options))
        except Exception as exc:
            raise UserError(f"INT8 quantization failed: {one_line(exc, 300, line=0, named=True)}") from None
    return {**settings.record(), "batchnorm_left_float": left_float, "calibration_samples": reader.count}
