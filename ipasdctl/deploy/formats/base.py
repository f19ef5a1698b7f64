"""The contract of an export format: one class per format, registered by name in FORMATS.

The pipeline (deploy/export.py) does what every format shares: load the run, fold the temperature, name the
files, skip what is unchanged, write the deployment metadata into each file, run `onnx.checker`, measure each
file's test top-1 with the format's own session, stage and publish the files atomically, write the records.
A format supplies the rest, in seven hooks (only `export` has no default):

    check(options)                    options wrong for this format, before anything runs (a chain: before training)
    settings(options) -> dict         what a rerun compares before it keeps an existing file (skip_unchanged)
    export(job, path) -> Written      write the file at `path`: from the PyTorch network, or from `made_from`'s file
    validate(job, path) -> dict       the record's "validation"; ExportValidationError past the format's tolerance
    finish(job, path, record) -> dict once its test top-1 is known: more metadata and record keys (INT8's speed check)
    summary(record) -> dict           what the record of `made_from` says of this file (under its precision key)
    session(path, threads, provider)  how eval, bench and predict run the file: execution providers, input dtype

A format that converts another (`made_from`, e.g. fp16 from the fp32 ONNX file) gets that file exported first
in the same export, and its record starts from that file's record. Attributes say what the format is; the
`ipasdctl list formats` table and `export --format` read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import numpy as np
import torch

from ...registry import Registry
from ..onnx_files import PROVIDERS, VALIDATION_BATCH_SIZES, ort_session

FORMATS: Registry[type["ExportFormat"]] = Registry("export format")


def batchnorm_count(model: torch.nn.Module) -> int:
    """The BatchNorm layers of a network (what a format that folds them reports against)."""
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@dataclass(frozen=True)
class ExportOptions:
    """The export command's options that formats read (each takes what it needs)."""

    opset: Optional[int] = None
    calib_samples: int = 512
    int8_target: str = "auto"
    validation_batch_sizes: tuple[int, ...] = VALIDATION_BATCH_SIZES
    eval_batch_size: int = 256


@dataclass
class Made:
    """One file this export has written so far (in the staging folder), with its record."""

    path: Path
    record: dict
    metadata: dict = field(default_factory=dict)  # what its `export` wrote into the file's metadata


@dataclass
class ExportJob:
    """What every format of one export is given."""

    model: torch.nn.Module  # the evaluation network in eval mode on the CPU, the fitted temperature folded in
    data: object  # the data set, preprocessed as the checkpoint was trained (test images; training images to calibrate)
    images: np.ndarray  # normalised float32 test images, as many as the largest validation batch
    options: ExportOptions
    staging: Path  # the hidden folder the files are written into before they are published
    made: dict[str, Made] = field(default_factory=dict)  # format name -> its file, in the order they were made

    def source_of(self, fmt: "ExportFormat") -> Made:
        """The file `fmt` is made from (exported before it in this export)."""
        return self.made[fmt.made_from]


@dataclass
class Written:
    """What `export` wrote besides the file: keys for the file's metadata and for its json record."""

    metadata: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


class ExportFormat:
    """One export format. Subclass, set the attributes, implement `export`, register with @FORMATS.register."""

    name: ClassVar[str] = ""  # the --format value, e.g. "onnx-fp16"
    suffix: ClassVar[str] = ""  # the file is <export name><suffix>.onnx (its json <export name><suffix>.json)
    precision: ClassVar[str] = "fp32"  # of the weights and activations: the record's and the metadata's `precision`
    made_from: ClassVar[Optional[str]] = None  # the format whose file this one converts; None: the PyTorch network
    summary_line: ClassVar[str] = ""  # one line for `ipasdctl list formats`
    tolerance: ClassVar[str] = ""  # how its outputs are validated, for `list formats` and the docs
    providers: ClassVar[Sequence[str]] = tuple(PROVIDERS)  # the `bench --provider` values it runs on
    input_dtype: ClassVar[type] = np.float32  # what its input takes (float32 images are cast to it)
    slower_note: ClassVar[str] = ""  # bench's one line when it is slower than its fp32 original on the CPU: why

    def file_name(self, stem: str) -> str:
        return f"{stem}{self.suffix}.onnx"

    def check(self, options: ExportOptions) -> None:
        """Refuse options this format cannot export with (one UserError line)."""

    def settings(self, options: ExportOptions) -> dict:
        """The options that shape this format's file: a rerun keeps the file only when they are unchanged."""
        return {}

    def export(self, job: ExportJob, path: Path) -> Written:
        raise NotImplementedError

    def validate(self, job: ExportJob, path: Path) -> dict:
        """The record's "validation" (its reference, tolerance and figures per batch size)."""
        return {}

    def finish(self, job: ExportJob, path: Path, record: dict) -> Written:
        """Once `record` has the file's test accuracy (`onnx_test`): metadata and record keys to add."""
        return Written()

    def summary(self, record: dict) -> dict:
        """What the record of `made_from` says of this format's file (under the key `precision`)."""
        test = record["onnx_test"]
        return {"onnx_file": record["onnx_file"], "precision": record["precision"], "test_top1": test["top1"],
                "test_top5": test["top5"], "file_size_bytes": record["file_size_bytes"],
                "validation": record["validation"]}

    def provider_chain(self, provider: str) -> list:
        """onnxruntime's providers (with their options) for a `--provider` value, in order of preference."""
        return list(PROVIDERS[provider])

    def session(self, path: Path, threads: Optional[int] = None, provider: str = "cpu"):
        """A session whose run(None, {input: images}) gives the logits (onnx_files.ModelSession's interface)."""
        return ort_session(path, threads, self.provider_chain(provider), self.input_dtype)
