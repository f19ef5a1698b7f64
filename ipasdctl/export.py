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
- INT8: `quant_pre_process` (shape inference + graph optimisation), then `quantize_static` in QDQ format with
  per-channel weights, MinMax ranges calibrated on training images (normalised, not augmented); its test
  top-1 is measured with onnxruntime on the whole test set next to the fp32 model's.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .errors import UserError

EXPORT_FORMAT = "ipasdctl-export-1"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ATOL = 1e-4
RTOL = 1e-3
VALIDATION_BATCH_SIZES = (1, 7, 64)  # batch 1, an odd batch, 64
# protobuf cannot hold a model of 2 GiB or more in one file; stay well below it
SINGLE_FILE_LIMIT_BYTES = 1_800_000_000
# metadata values that are JSON (lists, numbers); the rest are plain strings
_JSON_KEYS = ("class_names", "input_size", "mean", "std", "test_top1", "num_classes", "epoch", "opset",
              "calibration_samples", "fp32_test_top1")


class ExportValidationError(UserError):
    """The exported model disagrees with PyTorch (or fails the checker): nothing is written. Exit code 1."""

    exit_code = 1


# ------------------------------------------------------------------------------------------------ helpers


def _ort():
    import onnxruntime

    return onnxruntime


def cpu_session(model_path: Path, threads: Optional[int] = None, provider: str = "CPUExecutionProvider"):
    """An onnxruntime session on one provider; a file onnxruntime cannot load is a UserError."""
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=[provider])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot load {model_path}: {first[:200]}") from None


def check_onnx_file(model_path: Path):
    """The ModelProto of `model_path` (external data not loaded); anything that is not an ONNX model is a UserError."""
    import onnx

    model_path = Path(model_path)
    if not model_path.exists():
        raise UserError(f"{model_path} does not exist; give the path of an exported .onnx model")
    if not model_path.is_file():
        raise UserError(f"{model_path} is not a file; give the path of an exported .onnx model")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # DecodeError and friends
        raise UserError(f"{model_path} is not an ONNX model (it does not parse as one); "
                        "give a file written by `ipasdctl export --onnx`") from None
    if model.ir_version <= 0 or not model.graph.node or not model.graph.input:
        raise UserError(f"{model_path} is not an ONNX model (no graph in it); "
                        "give a file written by `ipasdctl export --onnx`")
    return model


def read_metadata(model_path: Path) -> dict:
    """The model's `metadata_props` as a dict, JSON-valued keys (lists, numbers) decoded."""
    model = check_onnx_file(model_path)
    return decode_metadata({p.key: p.value for p in model.metadata_props})


def decode_metadata(props: dict) -> dict:
    out = {}
    for key, value in props.items():
        if key in _JSON_KEYS:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def encode_metadata(values: dict) -> dict[str, str]:
    return {k: (json.dumps(v) if k in _JSON_KEYS else str(v)) for k, v in values.items() if v is not None}


def set_metadata(model_path: Path, values: dict) -> None:
    """Replace the model-level metadata keys in `values` (file rewritten in place: it is a staging file)."""
    import onnx

    model = onnx.load(str(model_path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(encode_metadata(values))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    _save_model(model, model_path)


def _save_model(model, path: Path) -> None:
    import onnx

    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    # the whole model is in memory; onnx appends to an existing data file, so start from none
    data_path.unlink(missing_ok=True)
    external = sum(t.ByteSize() for t in model.graph.initializer) > SINGLE_FILE_LIMIT_BYTES
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_path.name if external else None)
    if data_path.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(data_path, 0o666 & ~umask)  # onnx creates it private; give the model file's permissions


def _file_size(path: Path) -> int:
    """Bytes of the model including its external data file, if any."""
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


@contextlib.contextmanager
def _quiet_exporters():
    """The exporters log conversion attempts, deprecations and tracebacks they recover from: keep them out."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "root")
    loggers = [logging.getLogger(n) if n != "root" else logging.getLogger() for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:300]}"


# ------------------------------------------------------------------------------------------------ export


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def export_model(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: Optional[int] = None) -> dict:
    """Write `model` (eval mode) to `path` with a dynamic batch axis; the dynamo exporter first, TorchScript if
    it fails or cannot reach `opset`. Returns {"exporter", "opset", "fallback_reason"}."""
    model.eval()
    external = _parameter_bytes(model) > SINGLE_FILE_LIMIT_BYTES
    reason = None
    try:
        batch = torch.export.Dim("batch", min=1)
        with _quiet_exporters():
            program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},),
                                        external_data=external, verbose=False)
            program.save(str(path), external_data=external)
        got = _opset_of(path)
        if opset is None or got == opset:
            return {"exporter": "dynamo", "opset": got, "fallback_reason": None}
        reason = f"the dynamo exporter produced opset {got}, not the requested {opset}"
    except Exception as exc:  # the exporter raises many types; the reason goes into the json
        reason = f"dynamo exporter failed: {_first_line(exc)}"
    for leftover in (path, path.with_name(path.name + ".data")):
        leftover.unlink(missing_ok=True)
    try:
        with _quiet_exporters():
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset or 17, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    except Exception as exc:
        raise UserError(f"ONNX export failed with both exporters ({reason}; TorchScript exporter: "
                        f"{_first_line(exc)}); try another --opset") from None
    return {"exporter": "torchscript", "opset": _opset_of(path), "fallback_reason": reason}


def run_checker(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportValidationError(f"onnx.checker rejects the exported {path.name}: {_first_line(exc)}") from None


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
    session = cpu_session(onnx_path)
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


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_session(session, data, batch_size: int = 256) -> dict:
    """Top-1 / top-5 (%) and n of an onnxruntime session on the data set's whole test set."""
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    k = min(5, data.num_classes)
    top1 = topk = n = 0
    input_name = session.get_inputs()[0].name
    for x, y in data.test_batches(batch_size, torch.device("cpu")):
        logits = session.run(None, {input_name: np.ascontiguousarray(x.float().numpy())})[0]
        labels = y.numpy()
        pred = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        top1 += int((pred[:, 0] == labels).sum())
        topk += int((pred == labels[:, None]).any(1).sum())
        n += labels.shape[0]
    if n == 0:
        raise UserError("the test set is empty; nothing to evaluate")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * topk / n, "n": n}


def evaluate_onnx(model_path: Path, data_root: str | None, batch_size: int = 256) -> dict:
    """Top-1 / top-5 (%) and n of an exported model, with onnxruntime (CPU), on the test set of the data set
    named in its metadata."""
    from .config import DataConfig
    from .data import build_data

    model_path = Path(model_path)
    check_onnx_file(model_path)
    meta = read_metadata(model_path)
    if not meta.get("dataset"):
        raise UserError(f"{model_path} has no 'dataset' in its metadata; evaluate models written by "
                        "`ipasdctl export --onnx`")
    config = DataConfig(name=meta["dataset"], root=str(data_root) if data_root is not None else None)
    if meta.get("data_image_size"):
        config = replace(config, image_size=int(meta["data_image_size"]))
    data = build_data(config)
    expected = meta.get("input_size")
    if expected and list(data.image_shape) != list(expected):
        raise UserError(f"{model_path} takes {expected} images but data set '{meta['dataset']}' has "
                        f"{list(data.image_shape)}; give the data set it was trained on")
    return evaluate_session(cpu_session(model_path), data, batch_size)


# ------------------------------------------------------------------------------------------------ INT8


def calibration_batches(data, samples: int, batch_size: int = 64, seed: int = 0) -> Iterator[np.ndarray]:
    """`samples` training images (a seeded random choice), normalised and not augmented, in batches."""
    from .data import RandomBatches

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
    external = _file_size(fp32_path) > SINGLE_FILE_LIMIT_BYTES
    with _quiet_exporters():
        try:
            quant_pre_process(str(fp32_path), str(pre_path), save_as_external_data=external,
                              all_tensors_to_one_file=True)
        except Exception as exc:
            raise UserError(f"onnxruntime's quantization pre-processing failed: {_first_line(exc)}") from None
        reader = Reader(calibration)
        settings = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QInt8",
                    "weight_type": "QInt8", "calibrate_method": "MinMax"}
        try:
            quantize_static(str(pre_path), str(int8_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
                            calibration_providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"INT8 quantization failed: {_first_line(exc)}") from None
    settings["calibration_samples"] = reader.count
    return settings


# ------------------------------------------------------------------------------------------------ the command


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


def export_onnx(run_dir: Path, out_dir: Path = Path("exports"), opset: Optional[int] = None, int8: bool = False,
                calib_samples: int = 512, checkpoint: str = "best", data_root: Optional[str] = None,
                name: Optional[str] = None, validation_batch_sizes: Sequence[int] = VALIDATION_BATCH_SIZES,
                eval_batch_size: int = 256) -> dict:
    """Export, validate and (optionally) quantize one run; returns the fp32 model's json record."""
    import onnx
    import onnxruntime

    from . import __version__ as ipasdctl_version
    from . import runtime
    from .data import build_data
    from .engine import count_macs, count_params, load_run_model
    from .io import atomic_write_json

    run_dir = Path(run_dir)
    if opset is not None and not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise UserError(f"--opset must be between 7 and {onnx.defs.onnx_opset_version()}, got {opset}")
    if int8 and opset is not None and opset < 13:
        raise UserError(f"--int8 needs --opset 13 or newer (per-channel QDQ), got {opset}")
    if int8 and calib_samples <= 0:
        raise UserError(f"--calib-samples must be positive, got {calib_samples}")
    if not validation_batch_sizes or min(validation_batch_sizes) <= 0:
        raise UserError("validation batch sizes must be positive integers")
    model, state, recipe = load_run_model(run_dir, checkpoint, device="cpu")
    out_dir = _prepare_out(out_dir)
    name = name or (run_dir.resolve().name + ("" if checkpoint == "best" else f"-{checkpoint}"))
    if os.sep in name or name.startswith("."):
        raise UserError(f"--name '{name}' must be a plain file name (no folders, not hidden)")
    data_config = recipe.data if data_root is None else replace(recipe.data, root=str(data_root))
    data = build_data(data_config)
    if data.num_classes != int(state["num_classes"]):
        raise UserError(f"the checkpoint has {state['num_classes']} classes but data set '{data_config.name}' has "
                        f"{data.num_classes}; give the data set the run was trained on (--data)")
    image_shape = list(data.image_shape)

    base_meta = {
        "producer": "ipasdctl",
        "ipasdctl_version": ipasdctl_version,
        "method": recipe.method.get("name"),
        "arch": state.get("arch", recipe.model.arch),
        "dataset": data_config.name,
        "data_image_size": data_config.image_size,
        "num_classes": data.num_classes,
        "class_names": [str(c) for c in data.class_names],
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": image_shape,
        "layout": "NCHW",
        "mean": [float(v) for v in data.mean],
        "std": [float(v) for v in data.std],
        "preprocessing": "float32 NCHW, channels in the training data's order, x = (pixel / 255 - mean) / std per channel; output = logits",
        "checkpoint": checkpoint,
        "epoch": int(state.get("epoch", 0)),
        "test_top1": _checkpoint_top1(state, checkpoint),
        "source_run": str(run_dir.resolve()),
    }

    images = _sample_images(data, max(validation_batch_sizes))
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir))
    except OSError as exc:
        raise UserError(f"cannot write into {out_dir}: {exc.strerror or exc}; choose a writable --out") from None
    try:
        fp32_path = staging / f"{name}.onnx"
        started = time.perf_counter()
        exporter = export_model(model, torch.from_numpy(images[:2]), fp32_path, opset)
        export_seconds = time.perf_counter() - started
        set_metadata(fp32_path, {**base_meta, "precision": "fp32", "exporter": exporter["exporter"],
                                 "opset": exporter["opset"]})
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
            "file_size_bytes": _file_size(fp32_path),
            "validation": {"atol": ATOL, "rtol": RTOL, "provider": "CPUExecutionProvider",
                           "images": "test set", "batches": validation},
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "git_commit": runtime.git_commit(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        int8_record = None
        if int8:
            fp32_eval = evaluate_session(cpu_session(fp32_path), data, eval_batch_size)
            int8_path = staging / f"{name}-int8.onnx"
            settings = quantize_int8(fp32_path, int8_path, calibration_batches(data, calib_samples), staging)
            (staging / f"{fp32_path.stem}-preprocessed.onnx").unlink(missing_ok=True)
            run_checker(int8_path)
            int8_session = cpu_session(int8_path)
            fp32_session = cpu_session(fp32_path)
            agreement = []
            for b in validation_batch_sizes:
                x = images[:b]
                figures = compare_outputs(fp32_session.run(None, {INPUT_NAME: x})[0],
                                          int8_session.run(None, {INPUT_NAME: x})[0])
                figures.pop("within_tolerance")  # INT8 is not expected to match fp32 to 1e-4
                agreement.append({"batch_size": int(b), **figures})
            int8_eval = evaluate_session(int8_session, data, eval_batch_size)
            del int8_session, fp32_session
            set_metadata(int8_path, {**base_meta, "precision": "int8", "exporter": exporter["exporter"],
                                     "opset": _opset_of(int8_path), "test_top1": int8_eval["top1"],
                                     "fp32_test_top1": fp32_eval["top1"],
                                     "quantization": "static QDQ, per-channel int8 weights, int8 activations, "
                                                     f"MinMax on {settings['calibration_samples']} training images",
                                     "calibration_samples": settings["calibration_samples"]})
            run_checker(int8_path)
            record["onnx_test"] = fp32_eval
            int8_record = {
                **record,
                "name": f"{name}-int8",
                "onnx_file": int8_path.name,
                "precision": "int8",
                "opset": _opset_of(int8_path),
                "test_top1": int8_eval["top1"],
                "onnx_test": int8_eval,
                "fp32_onnx_test": fp32_eval,
                "quantization": settings,
                "file_size_bytes": _file_size(int8_path),
                "validation": {"reference": f"{fp32_path.name} (onnxruntime)", "images": "test set",
                               "batches": agreement},
            }
            record["int8"] = {"onnx_file": int8_path.name, "test_top1": int8_eval["top1"],
                              "test_top5": int8_eval["top5"], "file_size_bytes": int8_record["file_size_bytes"]}

        atomic_write_json(staging / f"{name}.json", record)
        if int8_record is not None:
            atomic_write_json(staging / f"{name}-int8.json", int8_record)
        # external data, then models, then the jsons: a json in the output folder implies a whole model
        stems = [name] + ([f"{name}-int8"] if int8_record is not None else [])
        finals = [f"{s}.onnx.data" for s in stems] + [f"{s}.onnx" for s in stems] + [f"{s}.json" for s in stems]
        for file_name in finals:
            if (staging / file_name).exists():
                os.replace(staging / file_name, out_dir / file_name)
            elif file_name.endswith(".onnx.data"):
                (out_dir / file_name).unlink(missing_ok=True)  # a previous, larger export's weights
    except OSError as exc:
        raise UserError(f"cannot write the export into {out_dir}: {exc.strerror or exc}; "
                        "free disk space or choose another --out") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record["onnx_path"] = str(out_dir / f"{name}.onnx")
    record["json_path"] = str(out_dir / f"{name}.json")
    if int8_record is not None:
        record["int8"]["onnx_path"] = str(out_dir / f"{name}-int8.onnx")
    return record
