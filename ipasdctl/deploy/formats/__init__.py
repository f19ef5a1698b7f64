"""Export formats: one module per format, each registering one ExportFormat (the contract is in base.py).

| format      | file              | precision                          | made from        | validated against                   |
|-------------|-------------------|------------------------------------|------------------|-------------------------------------|
| `onnx`      | `NAME.onnx`       | fp32                               | PyTorch          | PyTorch, atol 1e-4 / rtol 1e-3      |
| `onnx-int8` | `NAME-int8.onnx`  | int8 weights and activations (QDQ) | `NAME.onnx`      | the fp32 file: agreement reported   |
| `onnx-fp16` | `NAME-fp16.onnx`  | fp16 weights and activations, fp32 inputs and outputs | `NAME.onnx` | PyTorch, atol 1e-2 / rtol 1e-2 |

Adding a format is one file here: a subclass of ExportFormat with `@FORMATS.register`. `export --format`,
`list formats`, and `eval`, `bench` and `predict` (through `model_session`) find it by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ...errors import UserError
from ...registry import import_submodules
from ..onnx_files import onnx_test_data, read_metadata, session_accuracy
from .base import FORMATS, ExportFormat, ExportJob, ExportOptions, Made, Written

import_submodules(__name__, __path__, skip=("base",))  # each registers its own

DEFAULT_FORMAT = "onnx"
# the format of a file whose metadata names none (exported before formats were recorded, or by another tool)
BY_PRECISION = {"fp32": "onnx", "int8": "onnx-int8", "fp16": "onnx-fp16"}


def get_format(name: str) -> ExportFormat:
    return FORMATS.get(name)()


def parse_formats(text: str | Sequence[str]) -> list[str]:
    """'onnx,onnx-fp16' (or a list) -> the registered format names, each once; an unknown one is one line."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p).strip() for p in text]
    names = [p for p in parts if p]
    if not names:
        raise UserError(f"--format needs at least one format; known: {', '.join(FORMATS.names())}")
    return list(dict.fromkeys(get_format(n).name for n in names))


def export_plan(names: Sequence[str]) -> list[ExportFormat]:
    """The formats an export writes: those asked for, each after the format it is made from (added when it was
    not asked for: `onnx-fp16` alone also writes the fp32 `onnx` file it converts), each once."""
    plan: list[ExportFormat] = []

    def add(name: str, chain: tuple[str, ...] = ()) -> None:
        if name in chain:
            raise ValueError(f"export format '{name}' is made from itself ({' <- '.join(chain + (name,))})")
        if any(f.name == name for f in plan):
            return
        fmt = get_format(name)
        if fmt.made_from is not None:
            add(fmt.made_from, chain + (name,))
        plan.append(fmt)

    for name in names:
        add(name)
    return plan


def format_of(meta: dict, model_path: Optional[Path] = None) -> ExportFormat:
    """The format of an exported file from its metadata: `export_format`, else by its precision (fp32 = onnx)."""
    name = meta.get("export_format")
    if name is None:
        return get_format(BY_PRECISION.get(meta.get("precision"), DEFAULT_FORMAT))
    if name not in FORMATS:
        raise UserError(f"{model_path or 'the model'} was exported in format '{name}', which this ipasdctl does not "
                        f"know (known: {', '.join(FORMATS.names())}); export it again with this ipasdctl")
    return get_format(name)


def format_name(record: dict) -> str:
    """The format an export json record names (`export_format`), else the one of its precision."""
    name = record.get("export_format")
    if isinstance(name, str) and name:
        return name
    precision = record.get("precision") if isinstance(record.get("precision"), str) else "fp32"
    return BY_PRECISION.get(precision, precision)


def model_session(model_path: Path, threads: Optional[int] = None, provider: str = "cpu"):
    """The session eval, bench and predict run an exported file in: its format's (see ExportFormat.session)."""
    return format_of(read_metadata(model_path), model_path).session(Path(model_path), threads, provider)


def onnx_test_accuracy(model_path: Path, data_root: str | None, batch_size: int = 256) -> dict:
    """Top-1 / top-5 (%) and n of an exported model, in its format's session (onnxruntime's CPU provider), on
    the test set of the data set named in its metadata."""
    data, _ = onnx_test_data(model_path, data_root)
    return session_accuracy(model_session(model_path), data, batch_size)


__all__ = ["BY_PRECISION", "DEFAULT_FORMAT", "FORMATS", "ExportFormat", "ExportJob", "ExportOptions", "Made",
           "Written", "export_plan", "format_name", "format_of", "get_format", "model_session",
           "onnx_test_accuracy", "parse_formats"]
