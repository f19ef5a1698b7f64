"""The export pipeline: one run's evaluation network in one or several formats (deploy/formats/: `onnx` fp32,
`onnx-int8`, `onnx-fp16`), every file validated and measured before any is published.

`export_onnx(run_dir, out_dir, formats=["onnx", "onnx-fp16"])` does what every format shares, and each
format (one module in deploy/formats/) does its own part (export, validation, session):
1. Load the run's checkpoint; when `ipasdctl calibrate` fitted a temperature for it, fold it in: the graph
   ends with logits / T, so softmax of its output gives the calibrated probabilities, and the metadata records
   T. A temperature fitted on another epoch's checkpoint (the run trained on since) is refused: calibrate again.
2. Name the files after what the model is (export_names.py): `NAME.onnx`, `NAME-int8.onnx`, `NAME-fp16.onnx`,
   each with its record `NAME<suffix>.json`; a name another run's files hold is refused unless `overwrite`.
3. Skip an export whose checkpoint bytes, temperature and format settings are unchanged (`skip_unchanged`).
4. Each format after the one it is made from (fp16 and INT8 convert the fp32 file, which is written too): its
   export; the deployment metadata (method, arch, data set, class names, input size, mean/std, test top-1,
   precision, export_format) into the file's `metadata_props`, the `doc_string` and `model_version` (the
   checkpoint's training step); `onnx.checker(full_check=True)`; its validation; its test top-1 and top-5 on
   the whole test set in its own session; its `finish` (INT8: a quick p50 against fp32).
5. Everything is written into a hidden staging folder inside the output folder and renamed into place only
   after every check of every format passed (external data, then models, then jsons: a json in the folder
   implies a whole model), so an interrupted or failed export leaves no half-written model behind.

The record of the fp32 file (`NAME.json`) is returned; under each derived format's precision (`int8`,
`fp16`) it names that file with its test top-1 and top-5, size and what the format adds, and `formats`
lists the formats written.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..version import __version__ as ipasdctl_version
from .. import runtime
from ..data import build_data
from ..errors import UserError
from ..models import count_macs, count_params
from ..runs import RunFolder, load_model, read_json
from ..safe_io import (atomic_write_json, check_checkpoint, disk_full_error, make_staging_folder,
                       remove_staging_folder, sha256_of)
from .export_names import check_owner, export_name
from .formats import (DEFAULT_FORMAT, ExportFormat, ExportJob, ExportOptions, Made, export_plan, get_format,
                      parse_formats)
from .int8 import check_target
from .onnx_files import (EXPORT_FORMAT, INPUT_NAME, OUTPUT_NAME, VALIDATION_BATCH_SIZES, file_size, opset_of,
                         session_accuracy, set_metadata)
from .timing import LATENCY_CSV, forget_latencies
from .validation import ExportValidationError, compare_outputs, run_checker, validate_against_torch

INT8_FORMAT = "onnx-int8"  # what --int8 adds (and what --int8-target applies to)
__all__ = ["ExportValidationError", "TemperatureScaled", "check_export_options", "compare_outputs", "derived_summaries",
           "doc_string", "export_onnx", "validate_against_torch"]


class TemperatureScaled(torch.nn.Module):
    """The network with its logits divided by a fitted temperature (a constant Div at the end of the graph)."""

    def __init__(self, model: torch.nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def _as_trained(data_config, data, stats: dict):
    """(data config, data set) preprocessed as the checkpoint records its training data (pretrained weights bring
    their own mean/std, and an input size to image-file data sets left without data.image_size)."""
    shape = stats.get("image_shape")
    if shape and list(data.image_shape) != list(shape) and "image_size" in data_config.params:
        data_config = replace(data_config, params={**data_config.params, "image_size": int(shape[-1])})
        data = build_data(data_config)
    if stats.get("mean") and stats.get("std") and len(stats["mean"]) == data.image_shape[0]:
        data = replace(data, mean=[float(v) for v in stats["mean"]], std=[float(v) for v in stats["std"]])
    return data_config, data


def _sample_images(data, count: int) -> np.ndarray:
    """The first `count` normalised test images (the test set repeated when it is smaller)."""
    chunks, have = [], 0
    for x, _ in data.test_batches(max(count, 1), torch.device("cpu")):
        chunks.append(x.float().numpy())
        have += x.shape[0]
        if have >= count:
            break
    images = np.concatenate(chunks)
    if images.shape[0] < count:
        images = images[np.arange(count) % images.shape[0]]
    return np.ascontiguousarray(images[:count], dtype=np.float32)


def check_export_options(opset: Optional[int], int8: bool, calib_samples: int, checkpoint: str,
                         int8_target: str = "auto", formats: Optional[str | Sequence[str]] = None) -> list[ExportFormat]:
    """The export options that are wrong whatever the run (checked before a chain trains anything); returns the
    formats to write: `formats` (default: onnx) and onnx-int8 with `int8`, each after the one it is made from."""
    import onnx

    if opset is not None and not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"--opset must be between 7 and {onnx.defs.onnx_opset_version()}, got {opset}")
    names = parse_formats(formats) if formats is not None else [DEFAULT_FORMAT]
    plan = export_plan(names + ([INT8_FORMAT] if int8 else []))
    options = ExportOptions(opset=opset, calib_samples=calib_samples, int8_target=int8_target)
    for fmt in plan:
        fmt.check(options)
    check_checkpoint(checkpoint)
    check_target(int8_target)  # an unknown target says so, with or without --int8
    if int8_target != "auto" and INT8_FORMAT not in [f.name for f in plan]:
        raise UserError(f"--int8-target {int8_target} needs --int8 (it chooses how the INT8 model is quantised)")
    return plan


def _prepare_out(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out_dir}: {exc.strerror or exc}; choose a writable --out") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out_dir} is not writable; choose another --out")
    return out_dir


def _checkpoint_top1(state: dict, checkpoint: str) -> Optional[float]:
    if checkpoint == "best" and state.get("best", {}).get("top1", -1) >= 0:
        return float(state["best"]["top1"])
    rows = state.get("rows") or []
    return float(rows[-1]["test_top1"]) if rows else None


def doc_string(meta: dict, precision: str) -> str:
    """The model's one-paragraph description (ModelProto.doc_string): what it is and how good it is."""
    top1 = f"test top-1 {meta['test_top1']:.2f}%" if meta.get("test_top1") is not None else "test top-1 unknown"
    return (f"{meta['arch']} trained with {meta['method']} on {meta['dataset']} ({meta['num_classes']} classes), "
            f"{precision}: {top1} ({meta['checkpoint']} checkpoint, epoch {meta['epoch']}). Input "
            f"'{meta['input_name']}' float32 NCHW {meta['input_size']}, normalised (metadata: mean, std); output "
            f"'{meta['output_name']}'. Exported by ipasdctl {meta['ipasdctl_version']} from run {meta['source_run']}.")


def deployment_metadata(recipe, state: dict, data_config, data, temperature: Optional[float], checkpoint: str,
                        run_dir: Path) -> dict:
    """What every exported file says of itself (its metadata_props, and its json record)."""
    return {
        "producer": "ipasdctl",
        "ipasdctl_version": ipasdctl_version,
        "method": recipe.method.get("name"),
        "arch": state.get("arch", recipe.model.arch),
        "dataset": data_config.name,
        "data_image_size": data_config.params.get("image_size"),
        "num_classes": data.num_classes,
        "class_names": [str(c) for c in data.class_names],
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": list(data.image_shape),
        "layout": "NCHW",
        "mean": [float(v) for v in data.mean],
        "std": [float(v) for v in data.std],
        "preprocessing": "float32 NCHW, channels in the training data's order, x = (pixel / 255 - mean) / std per channel; "
                         + ("output = logits / temperature (softmax gives calibrated probabilities)" if temperature
                            else "output = logits"),
        "temperature": temperature,
        "checkpoint": checkpoint,
        "epoch": int(state.get("epoch", 0)),
        "test_top1": _checkpoint_top1(state, checkpoint),
        "source_run": run_dir.resolve().name,  # the run's name, not a path of this machine (the json has run_dir)
    }


def export_onnx(run_dir: Path, out_dir: Path = Path("exports"), opset: Optional[int] = None, int8: bool = False,
                calib_samples: int = 512, int8_target: str = "auto", checkpoint: str = "best",
                data_root: Optional[str] = None, name: Optional[str] = None,
                validation_batch_sizes: Sequence[int] = VALIDATION_BATCH_SIZES, eval_batch_size: int = 256,
                skip_unchanged: bool = False, overwrite: bool = False,
                formats: Optional[str | Sequence[str]] = None) -> dict:
    """Export one run in `formats` (default onnx; `int8=True` adds onnx-int8), validate and measure every file;
    returns the fp32 file's json record (see the module docstring), with `exported`: format -> path.

    The files are named after what the model is (export_names.export_name). Files of that name exported from
    another run are refused unless `overwrite`; every file of the name (INT8 and fp16 models, eval files, ...)
    is replaced together, and their rows leave the folder's latency.csv.
    `skip_unchanged`: when the output folder already holds this export in every format asked for, made from a
    checkpoint with the same bytes, the same temperature and the same format settings, return its record (with
    "skipped": True) instead of exporting again."""
    import onnx
    import onnxruntime

    run_dir = Path(run_dir)
    plan = check_export_options(opset, int8, calib_samples, checkpoint, int8_target, formats)
    if not validation_batch_sizes or min(validation_batch_sizes) <= 0:
        raise UserError("validation batch sizes must be positive integers")
    options = ExportOptions(opset, calib_samples, int8_target, tuple(int(b) for b in validation_batch_sizes),
                            eval_batch_size)
    # what a chain's rerun compares before it keeps an export (with the checkpoint and the temperature)
    settings = {fmt.name: fmt.settings(options) for fmt in plan}
    if not run_dir.exists():
        raise UserError(f"run folder {run_dir} does not exist; pass a run folder written by `ipasdctl train`")
    model, state, recipe = load_model(run_dir, checkpoint, device="cpu")
    temperature = RunFolder(run_dir).fitted_temperature(checkpoint, state)
    if temperature is not None:
        model = TemperatureScaled(model, temperature).eval()
    name = export_name(recipe, checkpoint, name)
    replaced = check_owner(out_dir, name, run_dir, overwrite)  # before anything is written
    out_dir = _prepare_out(out_dir)
    source_sha256 = sha256_of(RunFolder(run_dir).checkpoint(checkpoint))
    if skip_unchanged:
        kept = _unchanged_export(out_dir, name, plan, source_sha256, temperature, settings, opset)
        if kept is not None:
            return kept
    data_config = recipe.data if data_root is None else replace(recipe.data, root=str(data_root))
    data = build_data(data_config)
    if data.num_classes != int(state["num_classes"]):
        raise UserError(f"the checkpoint has {state['num_classes']} classes but data set '{data_config.name}' has "
                        f"{data.num_classes}; give the data set the run was trained on (--data)")
    data_config, data = _as_trained(data_config, data, state.get("data_stats") or {})
    meta = deployment_metadata(recipe, state, data_config, data, temperature, checkpoint, run_dir)
    shared = {  # the keys every record of this export has (each format's record adds its own)
        "format": EXPORT_FORMAT,
        "run_dir": str(run_dir.resolve()),
        **{k: v for k, v in meta.items() if k not in ("producer", "source_run")},
        "params": count_params(model),
        "macs": count_macs(model, tuple(data.image_shape), torch.device("cpu")),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "source_checkpoint_sha256": source_sha256,
        "formats": [fmt.name for fmt in plan],
        "export_settings": settings,
        "int8_options": settings.get(INT8_FORMAT, {}),  # the key records had before export_settings
        "git_commit": runtime.git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    model_version = int(state.get("global_step", 0))  # ModelProto.model_version: grows as a run trains on
    images = _sample_images(data, max(validation_batch_sizes))
    try:
        staging = make_staging_folder(out_dir, name)  # and the leftovers of a killed export of this name go
    except OSError as exc:
        raise UserError(f"cannot write into {out_dir}: {exc.strerror or exc}; choose a writable --out") from None
    try:
        job = ExportJob(model, data, images, options, staging)
        for fmt in plan:
            job.made[fmt.name] = _make(fmt, job, name, meta, shared, model_version)
        for fmt in plan:  # each source's record names the files made from it
            if fmt.made_from is not None:
                job.made[fmt.made_from].record[fmt.precision] = {"format": fmt.name,
                                                                 **fmt.summary(job.made[fmt.name].record)}
        for made in job.made.values():
            atomic_write_json(made.path.with_suffix(".json"), made.record)
        # external data, then models, then the jsons: a json in the output folder implies a whole model
        stems = [made.path.stem for made in job.made.values()]
        finals = [f"{s}.onnx.data" for s in stems] + [f"{s}.onnx" for s in stems] + [f"{s}.json" for s in stems]
        _remove_replaced(out_dir, replaced, {f for f in finals if (staging / f).exists()})
        for file_name in finals:
            if (staging / file_name).exists():
                os.replace(staging / file_name, out_dir / file_name)
    except OSError as exc:
        raise UserError(f"cannot write the export into {out_dir}: {exc.strerror or exc}; "
                        "free disk space or choose another --out") from None
    except Exception as exc:  # a library that lost an ENOSPC on the way ("Wire format was corrupt"): say so
        full = disk_full_error(out_dir, exc)
        if full is None:
            raise
        raise full from None
    finally:
        remove_staging_folder(staging)
    return _returned(out_dir, name, plan, {fmt: job.made[fmt].record for fmt in job.made})


def _make(fmt: ExportFormat, job: ExportJob, stem: str, meta: dict, shared: dict, model_version: int) -> Made:
    """One format's file in the staging folder: exported, described, checked, validated and measured."""
    path = job.staging / fmt.file_name(stem)
    source = job.made.get(fmt.made_from) if fmt.made_from is not None else None
    started = time.perf_counter()
    written = fmt.export(job, path)
    export_seconds = time.perf_counter() - started
    metadata = {**meta, **(source.metadata if source is not None else {}), **written.metadata,
                "precision": fmt.precision, "export_format": fmt.name, "opset": opset_of(path)}
    set_metadata(path, metadata, model_version, doc_string(meta, fmt.precision))
    run_checker(path)
    validation = fmt.validate(job, path)
    evaluation = session_accuracy(fmt.session(path), job.data, job.options.eval_batch_size)
    record = {
        **(source.record if source is not None else shared),
        "name": path.stem,
        "onnx_file": path.name,
        "precision": fmt.precision,
        "export_format": fmt.name,
        **written.record,
        "opset": opset_of(path),
        "export_seconds": export_seconds,
        "file_size_bytes": file_size(path),
        "validation": validation,
        "onnx_test": evaluation,
    }
    if source is not None:  # a derived file: its own test top-1, beside its source's
        of = source.record["precision"]  # fp32_onnx_test, fp32_onnx_file, fp32_test_top1
        record.update({"test_top1": evaluation["top1"], f"{of}_onnx_test": source.record["onnx_test"],
                       f"{of}_onnx_file": source.path.name})
        metadata.update({"test_top1": evaluation["top1"], f"{of}_test_top1": source.record["onnx_test"]["top1"]})
    finished = fmt.finish(job, path, record)
    record.update(finished.record)
    if source is not None or finished.metadata:
        metadata.update(finished.metadata)
        set_metadata(path, metadata, model_version, doc_string({**meta, "test_top1": metadata["test_top1"]},
                                                               fmt.precision))
        run_checker(path)
    return Made(path, record, written.metadata)


def derived_summaries(record: dict) -> list[dict]:
    """The entries a record has for the files made from it (`int8`, `fp16`, ...), in the order they were made."""
    return [value for value in record.values() if isinstance(value, dict) and value.get("format") in
            record.get("formats", ())]


def _returned(out_dir: Path, stem: str, plan: list[ExportFormat], records: dict[str, dict]) -> dict:
    """The record export_onnx returns: the fp32 file's (else the first format's) with the paths of every file."""
    main = DEFAULT_FORMAT if DEFAULT_FORMAT in records else plan[0].name
    record = dict(records[main])
    record["onnx_path"] = str(out_dir / record["onnx_file"])
    record["json_path"] = str(out_dir / Path(record["onnx_file"]).with_suffix(".json"))
    record["exported"] = {fmt.name: str(out_dir / fmt.file_name(stem)) for fmt in plan}
    for summary in derived_summaries(record):
        record[summary["precision"]] = {**summary, "onnx_path": str(out_dir / summary["onnx_file"])}
    return record


def _remove_replaced(out_dir: Path, replaced: list[Path], kept: set[str]) -> None:
    """Before the new files are renamed into place: the old model's jsons first (a json in the folder implies
    a whole model), its latency rows, then every other old file the new export does not replace (an INT8 or fp16
    model not asked for again, eval files of the old model, a previous, larger export's weights)."""
    for path in sorted(replaced, key=lambda p: p.suffix != ".json"):
        if path.suffix == ".json" or path.name not in kept:
            path.unlink(missing_ok=True)
    forget_latencies(out_dir / LATENCY_CSV, [p for p in replaced if p.suffix == ".onnx"])


def _unchanged_export(out_dir: Path, name: str, plan: list[ExportFormat], source_sha256: str,
                      temperature: Optional[float], settings: dict, opset: Optional[int]) -> Optional[dict]:
    """The record of an export in `out_dir` made from the same checkpoint bytes, with the same fitted temperature
    and in every format of `plan` with the same settings as asked now, or None."""
    main = DEFAULT_FORMAT if DEFAULT_FORMAT in [f.name for f in plan] else plan[0].name
    record = read_json(out_dir / Path(get_format(main).file_name(name)).with_suffix(".json"))
    if record is None or record.get("source_checkpoint_sha256") != source_sha256 or "onnx_test" not in record:
        return None
    if record.get("temperature") != temperature or (opset is not None and record.get("opset") != opset):
        return None
    recorded = record.get("export_settings") if isinstance(record.get("export_settings"), dict) else {}
    for fmt in plan:
        files = (out_dir / fmt.file_name(name), (out_dir / fmt.file_name(name)).with_suffix(".json"))
        if recorded.get(fmt.name) != settings[fmt.name] or not all(f.is_file() for f in files):
            return None
    asked = {fmt.name for fmt in plan}
    for summary in derived_summaries(record):  # a file made before but not asked for this time is not returned
        if summary["format"] not in asked:
            record.pop(summary["precision"], None)
    record["skipped"] = True
    return _returned(out_dir, name, plan, {main: record})
