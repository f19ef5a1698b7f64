"""ONNX export of a run's evaluation network, validation against PyTorch, and static INT8 quantization.

`export_onnx(run_dir, out_dir)` writes `<name>.onnx` (fp32, dynamic batch axis, deployment metadata in
`metadata_props`) and `<name>.json` (the same metadata plus validation figures and file size); with
`int8=True` also `<name>-int8.onnx` / `<name>-int8.json`. Everything is written into a hidden staging folder
inside the output folder and renamed into place only after every check passed, so an interrupted or failed
export leaves no half-written model behind.

- Exporter: `torch.onnx.export(..., dynamo=True, dynamic_shapes=...)` (the torch.export-based exporter that
  PyTorch 2.14 recommends); when it fails, or cannot produce the requested opset, the TorchScript exporter
  (`dynamo=False`, `dynamic_axes`) is used instead and the json says which one and why.
- Validation: `onnx.checker.check_model(full_check=True)`, then onnxruntime against PyTorch on real test
  images at batch 1, an odd batch and 64: pass iff |ort - torch| <= atol + rtol * |torch| element-wise
  (atol 1e-4, rtol 1e-3), with the max absolute difference and the top-1 agreement reported.
- Temperature: when `ipasdctl calibrate` fitted one for the checkpoint (the run folder's temperature.json),
  the exported graph ends with logits / T, so softmax of its output gives the calibrated probabilities;
  the metadata records T. A temperature fitted on another epoch's checkpoint (the run trained on since) is
  refused: calibrate again.
- INT8: `quant_pre_process` (shape inference + graph optimisation, which folds BatchNorm into convolutions),
  then `quantize_static` in QDQ format with per-channel weights, MinMax ranges calibrated on training images
  (normalised, not augmented), with the types and operators chosen for the target CPU (`int8.py`); its test
  top-1 is measured with onnxruntime on the whole test set next to the fp32 model's, and a quick p50 at batch 1
  of both models says whether INT8 is faster than fp32 on this CPU (`int8_pays`).
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
from ..errors import UserError, one_line
from ..models import count_macs, count_params
from ..runs import RunFolder, load_model, read_json
from ..safe_io import (atomic_write_json, check_checkpoint, disk_full_error, make_staging_folder,
                       remove_staging_folder, sha256_of)
from .bench import LATENCY_CSV, forget_latencies, int8_speed_check
from .export_names import check_owner, export_name
from .int8 import Int8Settings, calibration_batches, check_target, choose_settings, quantize_int8
from . import onnx_files
from .onnx_files import (ATOL, EXPORT_FORMAT, INPUT_NAME, OUTPUT_NAME, RTOL,
                         VALIDATION_BATCH_SIZES, file_size, opset_of, quiet_exporters, ort_session,
                         session_accuracy, set_metadata)


class ExportValidationError(UserError):
    """The exported model disagrees with PyTorch (or fails the checker): nothing is written. Exit code 1."""

    exit_code = 1


class TemperatureScaled(torch.nn.Module):
    """The network with its logits divided by a fitted temperature (a constant Div at the end of the graph)."""

    def __init__(self, model: torch.nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


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


def run_checker(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportValidationError(f"onnx.checker rejects the exported {path.name}: "
                                    f"{one_line(exc, 300, line=0, named=True)}") from None


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
                           batch_sizes: Sequence[int], atol: float = ATOL, rtol: float = RTOL) -> list[dict]:
    """onnxruntime vs PyTorch on `images[:b]` for each batch size b; raises ExportValidationError past tolerance."""
    session = ort_session(onnx_path)
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


def check_export_options(opset: Optional[int], int8: bool, calib_samples: int, checkpoint: str,
                         int8_target: str = "auto") -> Optional[Int8Settings]:
    """The export options that are wrong whatever the run (checked before a chain trains anything); returns the
    INT8 settings for `int8_target` with --int8, else None."""
    import onnx

    if opset is not None and not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"--opset must be between 7 and {onnx.defs.onnx_opset_version()}, got {opset}")
    if int8 and opset is not None and opset < 13:
        raise UserError(f"--int8 needs --opset 13 or newer (per-channel QDQ), got {opset}")
    if int8 and calib_samples <= 0:
        raise UserError(f"--calib-samples must be positive, got {calib_samples}")
    check_checkpoint(checkpoint)
    check_target(int8_target)  # an unknown target says so, with or without --int8
    if not int8 and int8_target != "auto":
        raise UserError(f"--int8-target {int8_target} needs --int8 (it chooses how the INT8 model is quantised)")
    return choose_settings(int8_target) if int8 else None


def _prepare_out(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out_dir}: {exc.strerror or exc}; choose a writable --out") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"output folder {out_dir} is not writable; choose another --out")
    return out_dir


def _batchnorm_count(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


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


def export_onnx(run_dir: Path, out_dir: Path = Path("exports"), opset: Optional[int] = None, int8: bool = False,
                calib_samples: int = 512, int8_target: str = "auto", checkpoint: str = "best",
                data_root: Optional[str] = None, name: Optional[str] = None,
                validation_batch_sizes: Sequence[int] = VALIDATION_BATCH_SIZES, eval_batch_size: int = 256,
                skip_unchanged: bool = False, overwrite: bool = False) -> dict:
    """Export, validate and (optionally) quantize one run; returns the fp32 model's json record.

    The files are named after what the model is (export_names.export_name). Files of that name exported from
    another run are refused unless `overwrite`; every file of the name (INT8 model, eval files, ...) is replaced
    together, and their rows leave the folder's latency.csv.
    `skip_unchanged`: when the output folder already holds this export (and its INT8 model, if asked for) made
    from a checkpoint with the same bytes, the same temperature and the same options, return its record (with
    "skipped": True) instead of exporting again."""
    import onnx
    import onnxruntime

    run_dir = Path(run_dir)
    int8_settings = check_export_options(opset, int8, calib_samples, checkpoint, int8_target)
    # what a chain's rerun compares before it keeps an export (with the checkpoint and the temperature)
    int8_options = {"int8": int8, "calib_samples": calib_samples, "int8_target": int8_target} if int8 else {}
    if not validation_batch_sizes or min(validation_batch_sizes) <= 0:
        raise UserError("validation batch sizes must be positive integers")
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
        kept = _unchanged_export(out_dir, name, source_sha256, temperature, int8_options, opset)
        if kept is not None:
            return kept
    data_config = recipe.data if data_root is None else replace(recipe.data, root=str(data_root))
    data = build_data(data_config)
    if data.num_classes != int(state["num_classes"]):
        raise UserError(f"the checkpoint has {state['num_classes']} classes but data set '{data_config.name}' has "
                        f"{data.num_classes}; give the data set the run was trained on (--data)")
    data_config, data = _as_trained(data_config, data, state.get("data_stats") or {})
    image_shape, mean, std = list(data.image_shape), data.mean, data.std

    base_meta = {
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
        "input_size": image_shape,
        "layout": "NCHW",
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "preprocessing": "float32 NCHW, channels in the training data's order, x = (pixel / 255 - mean) / std per channel; "
                         + ("output = logits / temperature (softmax gives calibrated probabilities)" if temperature
                            else "output = logits"),
        "temperature": temperature,
        "checkpoint": checkpoint,
        "epoch": int(state.get("epoch", 0)),
        "test_top1": _checkpoint_top1(state, checkpoint),
        "source_run": run_dir.resolve().name,  # the run's name, not a path of this machine (the json has run_dir)
    }
    # ModelProto.model_version: the checkpoint's training step, which grows as a run trains on
    model_version = int(state.get("global_step", 0))

    images = _sample_images(data, max(validation_batch_sizes))
    try:
        staging = make_staging_folder(out_dir, name)  # and the leftovers of a killed export of this name go
    except OSError as exc:
        raise UserError(f"cannot write into {out_dir}: {exc.strerror or exc}; choose a writable --out") from None
    try:
        fp32_path = staging / f"{name}.onnx"
        started = time.perf_counter()
        exporter = export_model(model, torch.from_numpy(images[:2]), fp32_path, opset)
        export_seconds = time.perf_counter() - started
        set_metadata(fp32_path, {**base_meta, "precision": "fp32", "exporter": exporter["exporter"],
                                 "opset": exporter["opset"]}, model_version, doc_string(base_meta, "fp32"))
        run_checker(fp32_path)
        validation = validate_against_torch(model, fp32_path, images, validation_batch_sizes)

        record = {
            "format": EXPORT_FORMAT,
            "name": name,
            "onnx_file": fp32_path.name,
            "precision": "fp32",
            "run_dir": str(run_dir.resolve()),
            **{k: v for k, v in base_meta.items() if k not in ("producer", "source_run")},
            "params": count_params(model),
            "macs": count_macs(model, tuple(image_shape), torch.device("cpu")),
            "exporter": exporter["exporter"],
            "fallback_reason": exporter["fallback_reason"],
            "opset": exporter["opset"],
            "export_seconds": export_seconds,
            "file_size_bytes": file_size(fp32_path),
            "validation": {"atol": ATOL, "rtol": RTOL, "provider": "CPUExecutionProvider",
                           "images": "test set", "batches": validation},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "source_checkpoint_sha256": source_sha256,
            "int8_options": int8_options,
            "git_commit": runtime.git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        fp32_session = ort_session(fp32_path)
        fp32_eval = session_accuracy(fp32_session, data, eval_batch_size)
        record["onnx_test"] = fp32_eval
        int8_record = None
        if int8:
            int8_path = staging / f"{name}-int8.onnx"
            settings = quantize_int8(fp32_path, int8_path, calibration_batches(data, calib_samples), staging,
                                     int8_settings)
            settings["batchnorm_folded"] = _batchnorm_count(model) - settings["batchnorm_left_float"]
            (staging / f"{fp32_path.stem}-preprocessed.onnx").unlink(missing_ok=True)
            run_checker(int8_path)
            int8_session = ort_session(int8_path)
            agreement = []
            for b in validation_batch_sizes:
                x = images[:b]
                figures = compare_outputs(fp32_session.run(None, {INPUT_NAME: x})[0],
                                          int8_session.run(None, {INPUT_NAME: x})[0])
                figures.pop("within_tolerance")  # INT8 is not expected to match fp32 to 1e-4
                agreement.append({"batch_size": int(b), **figures})
            int8_eval = session_accuracy(int8_session, data, eval_batch_size)
            del int8_session, fp32_session
            speed = int8_speed_check(fp32_path, int8_path, images[:1])
            set_metadata(int8_path, {**base_meta, "precision": "int8", "exporter": exporter["exporter"],
                                     "opset": opset_of(int8_path), "test_top1": int8_eval["top1"],
                                     "fp32_test_top1": fp32_eval["top1"],
                                     "quantization": f"static {int8_settings.describe()}, MinMax on "
                                                     f"{settings['calibration_samples']} training images",
                                     "int8_target": int8_settings.target, "quantization_settings": settings,
                                     "calibration_samples": settings["calibration_samples"],
                                     "int8_speed_check": speed},
                         model_version, doc_string({**base_meta, "test_top1": int8_eval["top1"]}, "int8"))
            run_checker(int8_path)
            int8_record = {
                **record,
                "name": f"{name}-int8",
                "onnx_file": int8_path.name,
                "precision": "int8",
                "opset": opset_of(int8_path),
                "test_top1": int8_eval["top1"],
                "onnx_test": int8_eval,
                "fp32_onnx_test": fp32_eval,
                "fp32_onnx_file": fp32_path.name,
                "quantization": settings,
                "speed_check": speed,
                "file_size_bytes": file_size(int8_path),
                "validation": {"reference": f"{fp32_path.name} (onnxruntime)", "images": "test set",
                               "batches": agreement},
            }
            record["int8"] = {"onnx_file": int8_path.name, "test_top1": int8_eval["top1"],
                              "test_top5": int8_eval["top5"], "file_size_bytes": int8_record["file_size_bytes"],
                              "target": int8_settings.target, "quantization": int8_settings.describe(),
                              "pays": speed["int8_pays"], "speed_check": speed}

        atomic_write_json(staging / f"{name}.json", record)
        if int8_record is not None:
            atomic_write_json(staging / f"{name}-int8.json", int8_record)
        # external data, then models, then the jsons: a json in the output folder implies a whole model
        stems = [name] + ([f"{name}-int8"] if int8_record is not None else [])
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
    record["onnx_path"] = str(out_dir / f"{name}.onnx")
    record["json_path"] = str(out_dir / f"{name}.json")
    if int8_record is not None:
        record["int8"]["onnx_path"] = str(out_dir / f"{name}-int8.onnx")
    return record


def _remove_replaced(out_dir: Path, replaced: list[Path], kept: set[str]) -> None:
    """Before the new files are renamed into place: the old model's jsons first (a json in the folder implies
    a whole model), its latency rows, then every other old file the new export does not replace (an INT8
    model not asked for again, eval files of the old model, a previous, larger export's weights)."""
    for path in sorted(replaced, key=lambda p: p.suffix != ".json"):
        if path.suffix == ".json" or path.name not in kept:
            path.unlink(missing_ok=True)
    forget_latencies(out_dir / LATENCY_CSV, [p for p in replaced if p.suffix == ".onnx"])


def _unchanged_export(out_dir: Path, name: str, source_sha256: str, temperature: Optional[float], int8_options: dict,
                      opset: Optional[int]) -> Optional[dict]:
    """The record of an export in `out_dir` made from the same checkpoint bytes, with the same fitted temperature
    and INT8 options as asked now, or None."""
    int8 = bool(int8_options)
    record = read_json(out_dir / f"{name}.json")
    if record is None or record.get("source_checkpoint_sha256") != source_sha256 or "onnx_test" not in record:
        return None
    if record.get("temperature") != temperature or (int8 and record.get("int8_options") != int8_options):
        return None
    if (opset is not None and record.get("opset") != opset) or not (out_dir / f"{name}.onnx").is_file():
        return None
    if int8 and ("int8" not in record or not (out_dir / f"{name}-int8.onnx").is_file()):
        return None
    record.update(onnx_path=str(out_dir / f"{name}.onnx"), json_path=str(out_dir / f"{name}.json"), skipped=True)
    if not int8:
        record.pop("int8", None)  # not asked for this time
    if "int8" in record:
        record["int8"]["onnx_path"] = str(out_dir / f"{name}-int8.onnx")
    return record
