"""Device, precision, seeding and environment facts (knows nothing of methods or data sets)."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was requested but CUDA is not available on this machine; use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got '{name}'")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    name = (name or "auto").lower()
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise UserError(f"precision must be auto, fp32, bf16 or fp16, got '{name}'")
    if name == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(device: torch.device, deterministic: bool = False) -> None:
    """CPU kernels used here are deterministic already (a resumed run is bitwise the uninterrupted one).
    On CUDA, cuDNN autotuning is on unless `deterministic`, which also asks PyTorch for deterministic
    kernels (slower; an op without one then raises) and cuBLAS for a fixed workspace."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def rng_state() -> dict:
    """Every global RNG (python, numpy, torch, each CUDA device), in a form that loads with weights_only=True."""
    state = {
        "python": random.getstate(),
        "numpy": {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
                  for k, v in zip(("kind", "keys", "pos", "has_gauss", "cached"), np.random.get_state())},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), int(n["pos"]), int(n["has_gauss"]), float(n["cached"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


_requested_threads: Optional[int] = None  # --threads: torch's count, and onnxruntime's (deploy.onnx_files)


def set_threads(threads: int) -> None:
    """This process's CPU thread count for torch and for every onnxruntime session opened after (--threads)."""
    global _requested_threads
    torch.set_num_threads(threads)
    _requested_threads = threads


def requested_threads() -> Optional[int]:
    """The count --threads set, or None (then onnxruntime picks its own: one per physical core)."""
    return _requested_threads


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def memory_bytes() -> int:
    """This machine's physical memory in bytes (a conservative 4 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not POSIX
        return 4 << 30


def max_threads() -> int:
    """The most threads an option may ask for: 4 x the CPUs this process may run on (more only contend)."""
    return 4 * available_cpus()


def check_thread_count(option: str, value: Optional[int]) -> None:
    """A thread count a user typed (`--threads`, `--threads-per-job`): from 1 to max_threads()."""
    if value is not None and not 0 < int(value) <= max_threads():
        raise UserError(f"{option} must be from 1 to {max_threads()} (4 x this machine's {available_cpus()} CPUs), "
                        f"got {value}")


def _cpuinfo(*keys: str) -> Optional[str]:
    """The value of the first /proc/cpuinfo line that starts with one of `keys`; None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def cpu_model() -> str:
    value = _cpuinfo("model name")
    return value.strip() if value is not None else platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux x86 'flags', ARM 'Features'); empty where unknown."""
    return frozenset((_cpuinfo("flags", "Features") or "").split())


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
