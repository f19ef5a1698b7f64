"""Initial weights from a file, and fitting a state dict into a model of the contract (models/base.py).

    read_weights_file(path)           a `.safetensors` file (the safetensors library) or a `.pt`/`.pth`/`.bin`
                                      read with torch.load(weights_only=True): a state dict, or a dict holding one
                                      under `state_dict` or `model`
    write_safetensors / read_preprocessing   a .safetensors file with its inputs' mean, std and size in its
                                      metadata (`ipasdctl prune` starts the recovery from one)
    fit_state_dict(model, state, ..)  load it: the classifier (`classifier.*`) is left at its fresh init when its
                                      shape differs (another class count); any other tensor that is missing,
                                      unexpected or of another shape is refused, naming the first one

Nothing here reaches a network; run folders and the libraries' zoos are resolved in runs/weights.py.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import UserError, one_line
from ..safe_io import atomic_write_bytes

CLASSIFIER_PREFIX = "classifier."  # the contract's final linear layer: replaced when the class count differs
STATE_DICT_KEYS = ("state_dict", "model")  # where a training script's checkpoint keeps its weights
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PREPROCESSING_KEYS = ("mean", "std", "input_size")  # what a .safetensors file's metadata may say of its inputs


@dataclass
class LoadedWeights:
    """What was loaded into a model: recorded in summary.json and config.yaml (`weights_loaded`)."""

    source: str  # the spec as given (a path, RUN, RUN:last, torchvision:ENUM, timm:TAG)
    sha256: Optional[str]  # of the file the tensors came from
    loaded: int = 0  # tensors loaded
    reinitialised: list[str] = field(default_factory=list)  # tensors left at their fresh init (the classifier)
    # the weights' own preprocessing when they carry one (ImageNet weights): the data set normalises with it
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    input_size: Optional[int] = None

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "tensors_loaded": self.loaded,
                "tensors_reinitialised": list(self.reinitialised), "mean": self.mean, "std": self.std,
                "input_size": self.input_size}

    def describe(self) -> str:
        fresh = f", re-initialised {len(self.reinitialised)} ({', '.join(self.reinitialised)})" \
            if self.reinitialised else ""
        digest = f" (sha256 {self.sha256[:12]})" if self.sha256 else ""
        return f"weights: {self.source}{digest}: loaded {self.loaded} tensors{fresh}"


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (see the module docstring); a UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model.weights={path}: no such file or run folder; give a .safetensors or .pt/.pth file, "
                        "a run folder, or torchvision[:ENUM] / timm[:TAG]")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise UserError(f"model.weights={path}: unknown weights format '{path.suffix}'; give a .safetensors file or a "
                    f"{'/'.join(PICKLE_SUFFIXES)} state dict")


def write_safetensors(path: Path, state: dict[str, torch.Tensor], preprocessing: Optional[dict] = None) -> None:
    """A state dict as a .safetensors file (atomically), with the preprocessing its network was trained with
    (mean, std, input_size) in the file's metadata, where read_preprocessing finds it."""
    from safetensors.torch import save

    metadata = {key: json.dumps(value) for key, value in (preprocessing or {}).items()
                if key in PREPROCESSING_KEYS and value is not None}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata or None))


def read_preprocessing(path: Path) -> dict:
    """The mean, std and input_size a .safetensors file records in its metadata (write_safetensors); {} when it
    records none or they are not numbers."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        values = {key: json.loads(metadata[key]) for key in PREPROCESSING_KEYS if key in metadata}
    except Exception:  # unreadable or foreign metadata: the weights alone (read_weights_file says if they are bad)
        return {}
    numbers = lambda v: isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)  # noqa: E731
    out = {key: [float(x) for x in values[key]] for key in ("mean", "std") if numbers(values.get(key))}
    if isinstance(values.get("input_size"), int) and 0 < values["input_size"] <= 1 << 16:
        out["input_size"] = values["input_size"]
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"model.weights={path} is not a readable safetensors file ({one_line(exc, 120)}); it may be "
                        "truncated or corrupt: download or save it again") from None


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"model.weights={path} needs more than weights-only loading ({one_line(exc, 100)}); it "
                        "could run code, so it was refused unread: save the state dict alone (torch.save("
                        "model.state_dict(), ...)) or as .safetensors") from None
    except Exception as exc:  # a torn zip, a wrong magic number, EOF
        raise UserError(f"model.weights={path} is not a readable torch file ({type(exc).__name__}); it may be "
                        "truncated or corrupt") from None
    if isinstance(state, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"model.weights={path} holds no state dict (a mapping of names to tensors, or one under "
                        f"{' / '.join(STATE_DICT_KEYS)})")
    return state


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                   sha256: Optional[str] = None, arch: str = "") -> LoadedWeights:
    """Load `state` into `model` in place (see the module docstring); what was loaded."""
    own = model.state_dict()
    what = f"model.weights={source}"
    arch_text = f" {arch}" if arch else " this architecture"
    for name in state:
        if name not in own:
            raise UserError(f"{what} does not fit{arch_text}: it holds '{name}', which the model has not "
                            "(weights of another architecture?)")
    keep = {}
    reinitialised = []
    for name, tensor in own.items():
        given = state.get(name)
        if name.startswith(CLASSIFIER_PREFIX) and (given is None or given.shape != tensor.shape):
            reinitialised.append(name)  # another class count: the new head starts fresh
            continue
        if given is None:
            raise UserError(f"{what} does not fit{arch_text}: it has no '{name}' (weights of another "
                            "architecture?)")
        if given.shape != tensor.shape:
            raise UserError(f"{what} does not fit{arch_text}: '{name}' is {tuple(given.shape)} in the file but "
                            f"{tuple(tensor.shape)} in the model (weights of another architecture or width?)")
        if given.is_floating_point() and not torch.isfinite(given).all():
            raise UserError(f"{what} holds non-finite values in '{name}'; use other weights")
        keep[name] = given
    model.load_state_dict(keep, strict=False)
    return LoadedWeights(source=source, sha256=sha256, loaded=len(keep), reinitialised=reinitialised)
