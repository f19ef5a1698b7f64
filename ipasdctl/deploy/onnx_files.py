"""Exported model files: reading and checking them, their deployment metadata, onnxruntime sessions (on the
execution provider asked for), and the test accuracy of a model as onnxruntime computes it (the deployed
runtime's own figure)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .. import runtime
from ..accuracy import topk_hits
from ..bounds import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIDE, whole
from ..config import DataConfig, shown
from ..data import build_data
from ..errors import UserError, did_you_mean, one_line

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
              "calibration_samples", "fp32_test_top1", "temperature", "quantization_settings", "int8_speed_check",
              "fp16_conversion")
# `bench --provider`: onnxruntime's execution providers in order of preference, the CPU last (what runs the
# operators the others lack); cuda and tensorrt come with the onnxruntime-gpu package only
PROVIDERS = {"cpu": ("CPUExecutionProvider",),
             "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
             "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")}


def ort_session(model_path: Path, threads: Optional[int] = None, providers: Sequence = ("CPUExecutionProvider",),
                input_dtype=np.float32):
    """An onnxruntime session on the given providers (in order of preference; a name, or (name, options)), all
    graph optimisations, one operator at a time with `threads` threads each, fed `input_dtype` (float32 images
    are cast to it). Any error onnxruntime raises on the file, loading it or running it, is one UserError line
    (see ModelSession)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: its error lines (on fd 2) would double the one UserError line
    threads = threads or runtime.requested_threads()  # --threads of the command, else onnxruntime's own
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise onnxruntime_error(model_path, "load", exc) from None
    return ModelSession(session, Path(model_path), input_dtype)


def check_provider(provider: Optional[str]) -> Optional[str]:
    """`provider` (a key of PROVIDERS, or None: the CPU, and CUDA where present) when this onnxruntime has it;
    else one line saying what to install."""
    if provider is None:
        return None
    if provider not in PROVIDERS:
        raise UserError(f"unknown --provider '{provider}'{did_you_mean(provider, PROVIDERS)}; known: "
                        f"{', '.join(PROVIDERS)}")
    import onnxruntime as ort

    wanted = PROVIDERS[provider][0]
    available = ort.get_available_providers()
    if wanted not in available:
        offered = ", ".join(p.removesuffix("ExecutionProvider") for p in available)
        raise UserError(f"--provider {provider} needs onnxruntime's {wanted}, which this onnxruntime "
                        f"{ort.__version__} lacks (it offers {offered}): install onnxruntime-gpu in place of "
                        "onnxruntime (pip uninstall onnxruntime; pip install onnxruntime-gpu), or use --provider cpu")
    return provider


def onnxruntime_error(model_path: Path, doing: str, exc: BaseException) -> UserError:
    """The one line for an onnxruntime failure on a model file: a file someone handed in can pass loading and
    still fail inside session.run (a bias of 17 values for 16 channels, an input of another type)."""
    detail = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", one_line(exc, 300)) or type(exc).__name__
    if isinstance(exc, MemoryError) or "allocate" in detail.lower():
        fix = "use a smaller batch size"
    else:
        fix = "the model file is malformed: export it again with `ipasdctl export --onnx`"
    return UserError(f"onnxruntime cannot {doing} {model_path}: {detail}; {fix}")


class ModelSession:
    """An onnxruntime InferenceSession whose run() answers any error in one UserError line; every other
    attribute (get_inputs, get_providers, ...) is the session's own. Inputs of another dtype than the model's
    `input_dtype` are cast to it first (a no-op for float32 models, which all of ipasdctl's formats are)."""

    def __init__(self, session, model_path: Path, input_dtype=np.float32):
        self.session = session
        self.model_path = model_path
        self.input_dtype = np.dtype(input_dtype)

    def run(self, output_names, feeds, run_options=None):
        feeds = {k: v.astype(self.input_dtype) if getattr(v, "dtype", self.input_dtype) != self.input_dtype else v
                 for k, v in feeds.items()}
        try:
            return self.session.run(output_names, feeds, run_options)
        except Exception as exc:  # onnxruntime's Fail, InvalidArgument, RuntimeException, ...; MemoryError
            raise onnxruntime_error(self.model_path, "run", exc) from None

    def __getattr__(self, name):
        return getattr(self.session, name)


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
    """The model's `metadata_props` as a dict, JSON-valued keys (lists, numbers) decoded and checked."""
    return metadata_of(check_onnx_file(model_path), model_path)


def metadata_of(proto, model_path: Path) -> dict:
    """The decoded metadata of a loaded model, every key a command reads checked against its schema (a file
    someone else made is untrusted input): a malformed value is one line naming the key."""
    meta = decode_metadata({p.key: p.value for p in proto.metadata_props})
    for key, problem in _metadata_problems(meta):
        raise UserError(f"{model_path} has malformed metadata: '{key}' is {shown(meta[key])}, expected {problem}; "
                        "export the model again with `ipasdctl export --onnx`")
    return meta


def _metadata_problems(meta: dict):
    """(key, what it should be) for each malformed value among the keys ipasdctl reads."""
    size = meta.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 3 and whole(size[0], 1, MAX_CHANNELS)
                                 and all(whole(v, 1, MAX_IMAGE_SIDE) for v in size[1:])):
        yield "input_size", f"[channels (1-{MAX_CHANNELS}), height, width (1-{MAX_IMAGE_SIDE} pixels)]"
    image_size = meta.get("data_image_size")
    if image_size is not None and not (isinstance(image_size, str) and image_size.isdigit()
                                       and 1 <= int(image_size[:5]) <= MAX_IMAGE_SIDE):
        yield "data_image_size", f"an image size from 1 to {MAX_IMAGE_SIDE} pixels"
    if "num_classes" in meta and not whole(meta["num_classes"], 1, MAX_CLASSES):
        yield "num_classes", f"an integer from 1 to {MAX_CLASSES}"
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        yield "class_names", "a list of names"
    for key in ("mean", "std"):
        if key in meta and not (isinstance(meta[key], list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in meta[key])):
            yield key, "a list of numbers"
    for key in ("dataset", "checkpoint", "source_run", "precision", "export_format"):
        if key in meta and not isinstance(meta[key], str):
            yield key, "a string"


def decode_metadata(props: dict) -> dict:
    out = {}
    for key, value in props.items():
        if key in _JSON_KEYS:
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):  # not JSON (or nested without end): kept as the string, then checked
                pass
        out[key] = value
    return out


def encode_metadata(values: dict) -> dict[str, str]:
    return {k: (json.dumps(v) if k in _JSON_KEYS else str(v)) for k, v in values.items() if v is not None}


def set_metadata(model_path: Path, values: dict, model_version: Optional[int] = None,
                 doc_string: Optional[str] = None) -> None:
    """Replace the model-level metadata keys in `values`, and the ModelProto's own `model_version` and
    `doc_string` when given (file rewritten in place: it is a staging file)."""
    import onnx

    model = onnx.load(str(model_path))
    if model_version is not None:
        model.model_version = int(model_version)
    if doc_string is not None:
        model.doc_string = doc_string
    props = {p.key: p.value for p in model.metadata_props}
    props.update(encode_metadata(values))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    save_model(model, model_path)


def save_model(model, path: Path) -> None:
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


def file_size(path: Path) -> int:
    """Bytes of the model including its external data file, if any."""
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def count_ops(path: Path, op_type: str) -> int:
    import onnx

    return sum(node.op_type == op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


@contextlib.contextmanager
def quiet_exporters():
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


def session_batches(session, data, batch_size: int = 256):
    """(logits, labels) of an onnxruntime session on each batch of the data set's test set, as CPU tensors."""
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    input_name = session.get_inputs()[0].name
    for x, y in data.test_batches(batch_size, torch.device("cpu")):
        yield torch.from_numpy(session.run(None, {input_name: np.ascontiguousarray(x.float().numpy())})[0]), y


def session_accuracy(session, data, batch_size: int = 256) -> dict:
    """Top-1 / top-5 (%) and n of an onnxruntime session on the data set's whole test set."""
    hits = torch.zeros(2, dtype=torch.long)  # top-1, top-5
    n = 0
    for logits, y in session_batches(session, data, batch_size):
        hits += topk_hits(logits, y, (1, 5))
        n += y.shape[0]
    top1, topk = hits.tolist()
    if n == 0:
        raise UserError("the test set is empty; nothing to evaluate")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * topk / n, "n": n}


def onnx_test_data(model_path: Path, data_root: str | None):
    """(the test data of the data set named in an exported model's metadata, that metadata)."""
    model_path = Path(model_path)
    meta = read_metadata(model_path)
    if not meta.get("dataset"):
        raise UserError(f"{model_path} has no 'dataset' in its metadata; evaluate models written by "
                        "`ipasdctl export --onnx`")
    params = {"image_size": int(meta["data_image_size"])} if meta.get("data_image_size") else {}
    config = DataConfig(name=meta["dataset"], root=str(data_root) if data_root is not None else None, params=params)
    data = build_data(config)
    expected = meta.get("input_size")
    if expected and list(data.image_shape) != list(expected):
        raise UserError(f"{model_path} takes {expected} images but data set '{meta['dataset']}' has "
                        f"{list(data.image_shape)}; give the data set it was trained on")
    return data, meta
