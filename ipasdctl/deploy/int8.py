"""Static INT8 quantisation of an exported model: calibration on training images, QDQ with per-channel
weights after onnxruntime's pre-processing."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..data import RandomBatches
from ..errors import UserError
from . import onnx_files
from .onnx_files import INPUT_NAME, file_size, first_line, quiet_exporters


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


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: Iterator[np.ndarray], work_dir: Path) -> dict:
    """Static INT8 (QDQ, per-channel weights, MinMax) after onnxruntime's pre-processing."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
            raise UserError(f"onnxruntime's quantization pre-processing failed: {first_line(exc)}") from None
        reader = Reader(calibration)
        settings = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QInt8",
                    "weight_type": "QInt8", "calibrate_method": "MinMax"}
        try:
            quantize_static(str(pre_path), str(int8_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
                            calibration_providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"INT8 quantization failed: {first_line(exc)}") from None
    settings["calibration_samples"] = reader.count
    return settings
