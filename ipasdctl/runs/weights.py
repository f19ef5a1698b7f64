"""Where a model's initial weights (`model.weights`) or a teacher (`method.teacher` of kd) come from: a spec.

    path/to/file.safetensors | .pt | .pth   a state dict file (models/weights.py reads it)
    RUN | RUN:best | RUN:last               a run folder's checkpoint (best by default); its data's mean/std
    torchvision | torchvision:ENUM          a tv_* architecture's ImageNet weights (DEFAULT, or e.g. IMAGENET1K_V2),
                                            through torchvision's cache (TORCH_HOME/hub/checkpoints); downloaded
                                            there when missing and the network allows
    timm | timm:TAG                         a timm:<name> architecture's pretrained weights, through timm's own
                                            download and cache (the Hugging Face hub cache)

Offline with nothing cached is one line naming the file to place and the folder it belongs in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError, one_line
from ..models.weights import LoadedWeights, fit_state_dict, read_preprocessing, read_weights_file
from ..safe_io import sha256_of
from .folder import RunFolder

CHECKPOINT_NAMES = ("best", "last")


@dataclass
class WeightsSource:
    """The tensors a spec names, before they are fitted into a model."""

    spec: str
    state: dict[str, torch.Tensor]
    sha256: Optional[str]
    arch: Optional[str] = None  # the architecture they belong to, when the source says (a run folder)
    num_classes: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    input_size: Optional[int] = None


def split_run_spec(spec: str) -> Optional[tuple[Path, str]]:
    """(run folder, checkpoint) when `spec` names a folder (RUN, RUN:best, RUN:last), else None."""
    path, which = spec, "best"
    head, _, tail = spec.rpartition(":")
    if head and tail in CHECKPOINT_NAMES:
        path, which = head, tail
    return (Path(path), which) if Path(path).is_dir() else None


def require_finished(folder: Path, said: str) -> None:
    """A UserError unless `folder` holds a finished run; `said` is where it was named (method.teacher=RUN)."""
    summary = RunFolder(folder).read_summary()
    if summary is None or not summary.finished:
        raise UserError(f"{said}: {folder} is not a finished run (no finished summary.json); let its training "
                        "finish (ipasdctl train --resume), or give another run folder")


def read_source(spec: str, arch: str) -> WeightsSource:
    """The tensors `spec` names for a model of `arch` (see the module docstring); a UserError otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("model.weights must be a file, a run folder, or torchvision[:ENUM] / timm[:TAG]")
    kind, _, tag = spec.partition(":")
    if kind == "torchvision":
        return _torchvision_source(spec, arch, tag or "DEFAULT")
    if kind == "timm":
        from ..models.timm_models import timm_pretrained_state

        state, meta = timm_pretrained_state(arch, tag or None, spec)
        return WeightsSource(spec, state, meta.get("sha256"), mean=meta.get("mean"), std=meta.get("std"),
                             input_size=meta.get("input_size"))
    run = split_run_spec(spec)
    if run is not None:
        return _run_source(spec, *run)
    path = Path(spec).expanduser()
    state = read_weights_file(path)
    prep = read_preprocessing(path) if path.suffix == ".safetensors" else {}  # a pruned run's: its source's data
    return WeightsSource(spec, state, sha256_of(path), mean=prep.get("mean"), std=prep.get("std"),
                         input_size=prep.get("input_size"))


def _run_source(spec: str, run_dir: Path, which: str) -> WeightsSource:
    folder = RunFolder(run_dir)
    if not folder.checkpoint(which).is_file():
        raise UserError(f"{spec}: {run_dir} has no checkpoints/{which}.pt; give the folder of an `ipasdctl train` "
                        "run (RUN for its best checkpoint, RUN:last for the last)")
    state = folder.load_state(which)
    stats = state.get("data_stats") or {}
    return WeightsSource(spec, state["model"], sha256_of(folder.checkpoint(which)),
                         arch=state.get("arch") or (state["config"].get("model") or {}).get("arch"),
                         num_classes=int(state["num_classes"]), mean=stats.get("mean"), std=stats.get("std"))


def _torchvision_source(spec: str, arch: str, enum_name: str) -> WeightsSource:
    from ..models.torchvision_models import TORCHVISION_ARCHS, torchvision_key_map

    if arch not in TORCHVISION_ARCHS:
        raise UserError(f"model.weights={spec} is for torchvision's architectures (tv_*: "
                        f"{', '.join(sorted(TORCHVISION_ARCHS))}); {arch} is not one: give a weights file or a run "
                        "folder instead")
    import torchvision

    tv_arch = TORCHVISION_ARCHS[arch][0]
    enum = torchvision.models.get_model_weights(tv_arch)
    names = [name for name in enum.__members__]
    if enum_name not in names:
        raise UserError(f"model.weights={spec}: torchvision has no weights '{enum_name}' for {tv_arch}; known: "
                        f"{', '.join(names)}")
    weights = enum[enum_name]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / Path(weights.url).name
    if not file.is_file():
        try:
            torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
        except Exception as exc:  # offline, a proxy, a full disk: never a silent random start
            raise UserError(f"model.weights={spec}: {file.name} is not in torchvision's cache and could not be "
                            f"downloaded ({type(exc).__name__}: {one_line(exc, 80)}); place {weights.url} in "
                            f"{folder} (TORCH_HOME sets that folder's parent)") from None
    mapping = torchvision_key_map(arch)
    state = {mapping.get(key, key): tensor for key, tensor in read_weights_file(file).items()}
    transform = weights.transforms()
    return WeightsSource(spec, state, sha256_of(file), mean=[float(v) for v in transform.mean],
                         std=[float(v) for v in transform.std], input_size=int(transform.crop_size[0]))


def fit_source(model: torch.nn.Module, source: WeightsSource, arch: str) -> LoadedWeights:
    """Fit a source's tensors into `model` (in place); what was loaded, with the weights' preprocessing."""
    if source.arch is not None and source.arch != arch:
        raise UserError(f"{source.spec} holds a {source.arch}, but this model is a {arch}; give weights of a "
                        f"{arch} (or use --arch {source.arch})")
    loaded = fit_state_dict(model, source.state, source.spec, source.sha256, arch)
    loaded.mean, loaded.std, loaded.input_size = source.mean, source.std, source.input_size
    return loaded


def load_weights(model: torch.nn.Module, spec: str, arch: str) -> LoadedWeights:
    """Fit the tensors `spec` names into `model` (in place)."""
    return fit_source(model, read_source(spec, arch), arch)
